#pragma once
// Batches for training and evaluation: worker threads decode and transform
// ahead of the consumer, at most `prefetch` batches ahead so memory stays
// bounded. Every sample's randomness comes from (seed, epoch, index), so a
// batch is the same whatever the number of workers.
#include <torch/torch.h>

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <opencv2/core.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "data/datasets.h"
#include "data/image_folder.h"
#include "data/transforms.h"

namespace vitlab {

// Where samples come from: decoded 8-bit HWC images with in_chans channels.
class ImageSource {
 public:
  virtual ~ImageSource() = default;
  virtual int64_t size() const = 0;
  virtual int64_t label(int64_t index) const = 0;
  // An unreadable sample throws Error naming it.
  virtual cv::Mat image(int64_t index, int in_chans) const = 0;
  virtual const std::vector<std::string>& classes() const = 0;
};

class MemorySource : public ImageSource {
 public:
  explicit MemorySource(ImageSet set);
  int64_t size() const override { return set_.size(); }
  int64_t label(int64_t index) const override;
  cv::Mat image(int64_t index, int in_chans) const override;
  const std::vector<std::string>& classes() const override { return set_.classes; }

 private:
  ImageSet set_;
};

class FolderSource : public ImageSource {
 public:
  explicit FolderSource(ImageFolder folder, int64_t max_pixels = kMaxImagePixels)
      : folder_(std::move(folder)), max_pixels_(max_pixels) {}
  int64_t size() const override { return static_cast<int64_t>(folder_.samples.size()); }
  int64_t label(int64_t index) const override { return folder_.samples.at(index).label; }
  cv::Mat image(int64_t index, int in_chans) const override;
  const std::vector<std::string>& classes() const override { return folder_.classes; }

 private:
  ImageFolder folder_;
  int64_t max_pixels_;
};

// The first `limit` samples of another source.
class SubsetSource : public ImageSource {
 public:
  SubsetSource(std::shared_ptr<const ImageSource> source, int64_t limit)
      : source_(std::move(source)), size_(std::min(limit, source_->size())) {}
  int64_t size() const override { return size_; }
  int64_t label(int64_t index) const override { return source_->label(index); }
  cv::Mat image(int64_t index, int in_chans) const override { return source_->image(index, in_chans); }
  const std::vector<std::string>& classes() const override { return source_->classes(); }

 private:
  std::shared_ptr<const ImageSource> source_;
  int64_t size_;
};

struct LoaderOptions {
  int64_t batch_size = 64;
  bool train = true;      // random transforms and a shuffled order; else eval transforms in order
  bool drop_last = true;  // only when training
  int workers = 2;
  int prefetch = 4;  // batches ready ahead of the consumer, at most
  uint64_t seed = 0;
  bool skip_errors = true;  // data.on_error: skip (warn once per file, count) or fail
  bool pin_memory = false;
  // Data-parallel shard, as PyTorch's DistributedSampler: each epoch's order
  // (the same on every rank) padded by wrapping around to a multiple of
  // world_size when training, then every world_size-th sample from rank.
  // Evaluation is not padded: the ranks' counts add up to the split.
  int rank = 0;
  int world_size = 1;
};

struct Batch {
  torch::Tensor images;  // float [B, C, H, W]
  torch::Tensor labels;  // int64 [B]
};

// One 64-bit seed from several, well mixed (splitmix64).
uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c = 0);

class DataLoader {
 public:
  DataLoader(std::shared_ptr<const ImageSource> source, TransformOptions transform, LoaderOptions options);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  int64_t num_batches() const;
  int64_t num_samples() const { return source_->size(); }
  int64_t shard_size() const;  // the samples this rank sees per epoch
  const ImageSource& source() const { return *source_; }

  // Starts an epoch's workers; next() then yields its batches in order,
  // from batch first_batch (resuming inside an epoch: the batches are those
  // of a start at 0), and std::nullopt at the end. A batch whose samples all
  // failed is left out.
  void begin_epoch(int64_t epoch, int64_t first_batch = 0);
  std::optional<Batch> next();
  // The index of the batch next() looks at next: where to resume.
  int64_t position() const;

  // Distinct samples skipped as unreadable so far.
  int64_t skipped() const;

 private:
  void stop();
  void work();
  std::optional<Batch> make_batch(int64_t batch_index);

  std::shared_ptr<const ImageSource> source_;
  TransformOptions transform_;
  LoaderOptions options_;

  std::vector<int64_t> order_;
  int64_t epoch_ = 0;
  std::vector<std::thread> workers_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  int64_t claimed_ = 0;   // next batch index a worker takes
  int64_t consumed_ = 0;  // next batch index next() returns
  bool stopping_ = false;
  std::map<int64_t, std::optional<Batch>> ready_;
  std::exception_ptr error_;
  int64_t error_batch_ = -1;
  std::set<int64_t> skipped_;
};

}  // namespace vitlab
