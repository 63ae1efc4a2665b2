#include "data/loader.h"

#include <fmt/format.h>

#include <numeric>
#include <opencv2/imgproc.hpp>
#include <random>

#include "common/error.h"

namespace vitlab {

MemorySource::MemorySource(ImageSet set) : set_(std::move(set)) {
  if (set_.images.dim() != 4 || set_.images.scalar_type() != torch::kUInt8)
    fail("in-memory images must be uint8 [N, H, W, C], got {}", c10::toString(set_.images.scalar_type()));
  set_.images = set_.images.contiguous();
}

int64_t MemorySource::label(int64_t index) const { return set_.labels[index].item<int64_t>(); }

cv::Mat MemorySource::image(int64_t index, int in_chans) const {
  torch::Tensor img = set_.images[index];
  const int c = static_cast<int>(img.size(2));
  cv::Mat view(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC(c), img.data_ptr<uint8_t>());
  cv::Mat out;
  if (c == in_chans)
    out = view.clone();
  else if (c == 1 && in_chans == 3)
    cv::cvtColor(view, out, cv::COLOR_GRAY2RGB);
  else if (c == 3 && in_chans == 1)
    cv::cvtColor(view, out, cv::COLOR_RGB2GRAY);
  else
    fail("image {} has {} channels, model.in_chans is {}", index, c, in_chans);
  return out;
}

cv::Mat FolderSource::image(int64_t index, int in_chans) const {
  return decode_image(folder_.samples.at(index).path, in_chans, max_pixels_);
}

uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
  auto splitmix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  return splitmix(a ^ splitmix(b ^ splitmix(c)));
}

DataLoader::DataLoader(std::shared_ptr<const ImageSource> source, TransformOptions transform, LoaderOptions options)
    : source_(std::move(source)), transform_(std::move(transform)), options_(options) {
  if (options_.batch_size < 1) fail("train.batch_size must be >= 1, got {}", options_.batch_size);
  if (options_.workers < 1) fail("data.workers must be >= 1, got {}", options_.workers);
  if (options_.prefetch < 1) fail("data.prefetch must be >= 1, got {}", options_.prefetch);
  if (source_->size() == 0) fail("the dataset has no samples");
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size)
    fail("data loader: rank {} of world size {} is out of range", options_.rank, options_.world_size);
  transform_.validate();
}

DataLoader::~DataLoader() { stop(); }

int64_t DataLoader::shard_size() const {
  const int64_t n = source_->size(), w = options_.world_size, r = options_.rank;
  if (options_.train) return (n + w - 1) / w;
  return r < n ? (n - r + w - 1) / w : 0;
}

int64_t DataLoader::num_batches() const {
  const int64_t n = shard_size(), b = options_.batch_size;
  return options_.train && options_.drop_last ? n / b : (n + b - 1) / b;
}

int64_t DataLoader::position() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return consumed_;
}

int64_t DataLoader::skipped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(skipped_.size());
}

void DataLoader::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void DataLoader::begin_epoch(int64_t epoch, int64_t first_batch) {
  TORCH_CHECK(first_batch >= 0 && first_batch <= num_batches(), "begin_epoch: first batch ", first_batch,
              " is outside the epoch's ", num_batches(), " batches");
  stop();
  epoch_ = epoch;
  order_.resize(source_->size());
  std::iota(order_.begin(), order_.end(), 0);
  if (options_.train) {
    // Fisher-Yates with our own draws: the order depends on (seed, epoch) only.
    std::mt19937_64 rng(mix_seed(options_.seed, static_cast<uint64_t>(epoch), ~0ULL));
    for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng() % i]);
  }
  if (options_.world_size > 1) {
    const int64_t n = static_cast<int64_t>(order_.size()), w = options_.world_size;
    std::vector<int64_t> shard;
    for (int64_t i = options_.rank; i < (options_.train ? shard_size() * w : n); i += w) shard.push_back(order_[i % n]);
    order_ = std::move(shard);
  }
  claimed_ = consumed_ = first_batch;
  stopping_ = false;
  ready_.clear();
  error_ = nullptr;
  error_batch_ = -1;
  for (int i = 0; i < options_.workers; ++i) workers_.emplace_back([this] { work(); });
}

void DataLoader::work() {
  const int64_t total = num_batches();
  for (;;) {
    int64_t k;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || claimed_ >= total || claimed_ < consumed_ + options_.prefetch; });
      if (stopping_ || claimed_ >= total) return;
      k = claimed_++;
    }
    std::optional<Batch> batch;
    std::exception_ptr error;
    try {
      batch = make_batch(k);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && (!error_ || k < error_batch_)) {
        error_ = error;
        error_batch_ = k;
      }
      ready_[k] = std::move(batch);
    }
    cv_.notify_all();
  }
}

std::optional<Batch> DataLoader::make_batch(int64_t k) {
  const int64_t begin = k * options_.batch_size;
  const int64_t end = std::min<int64_t>(begin + options_.batch_size, static_cast<int64_t>(order_.size()));
  std::vector<torch::Tensor> images;
  std::vector<int64_t> labels;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t index = order_[i];
    try {
      cv::Mat img = source_->image(index, static_cast<int>(transform_.in_chans));
      if (options_.train) {
        std::mt19937_64 rng(mix_seed(options_.seed, static_cast<uint64_t>(epoch_), static_cast<uint64_t>(index)));
        images.push_back(train_transform(img, transform_, rng));
      } else {
        images.push_back(eval_transform(img, transform_));
      }
      labels.push_back(source_->label(index));
    } catch (const Error& e) {
      if (!options_.skip_errors) throw;
      std::lock_guard<std::mutex> lock(mutex_);
      if (skipped_.insert(index).second) fmt::print(stderr, "warning: skipping {}\n", e.what());
    }
  }
  if (images.empty()) return std::nullopt;
  Batch batch{torch::stack(images), torch::tensor(labels, torch::kInt64)};
  if (options_.pin_memory && torch::cuda::is_available()) {
    batch.images = batch.images.pin_memory();
    batch.labels = batch.labels.pin_memory();
  }
  return batch;
}

std::optional<Batch> DataLoader::next() {
  const int64_t total = num_batches();
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (consumed_ >= total) return std::nullopt;
    cv_.wait(lock, [&] { return ready_.count(consumed_) || stopping_; });
    if (stopping_ && !ready_.count(consumed_)) return std::nullopt;
    if (error_ && error_batch_ == consumed_) std::rethrow_exception(error_);
    std::optional<Batch> batch = std::move(ready_[consumed_]);
    ready_.erase(consumed_++);
    cv_.notify_all();
    if (batch) return batch;
  }
}

}  // namespace vitlab
