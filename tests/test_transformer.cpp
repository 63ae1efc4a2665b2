#include <catch2/catch.hpp>

#include "models/transformer.h"

using namespace vitlab;

namespace {

constexpr int64_t kPad = 0, kBos = 1, kEos = 2, kFirstSymbol = 3, kSymbols = 10, kLen = 8;

// The reverse task: src = random symbols, target = the same reversed.
struct Batch {
  torch::Tensor src, tgt_in, tgt_out;
};

Batch reverse_batch(int64_t n, torch::Generator& gen) {
  torch::Tensor src = torch::randint(kFirstSymbol, kFirstSymbol + kSymbols, {n, kLen}, gen, torch::kInt64);
  torch::Tensor rev = src.flip({1});
  torch::Tensor bos = torch::full({n, 1}, kBos, torch::kInt64), eos = torch::full({n, 1}, kEos, torch::kInt64);
  return {src, torch::cat({bos, rev}, 1), torch::cat({rev, eos}, 1)};
}

TransformerOptions toy_options() {
  TransformerOptions o;
  o.d_model = 64;
  o.nhead = 4;
  o.num_encoder_layers = 2;
  o.num_decoder_layers = 2;
  o.dim_feedforward = 128;
  o.dropout = 0.0;
  o.src_vocab_size = o.tgt_vocab_size = kFirstSymbol + kSymbols;
  o.pad_id = kPad;
  return o;
}

}  // namespace

TEST_CASE("Seq2SeqTransformer learns to reverse sequences (>= 99% token accuracy, greedy decoding)") {
  torch::manual_seed(0);
  auto gen = at::detail::createCPUGenerator(42);
  Seq2SeqTransformer model(toy_options());
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3).betas({0.9, 0.98}));
  Batch held_out = reverse_batch(256, gen);

  double accuracy = 0.0;
  for (int step = 1; step <= 2000 && accuracy < 0.995; ++step) {
    model->train();
    Batch b = reverse_batch(64, gen);
    torch::Tensor logits = model(b.src, b.tgt_in);
    torch::Tensor loss =
        torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), b.tgt_out.reshape({-1}));
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step % 100 == 0) {
      model->eval();
      torch::Tensor decoded = model->greedy_decode(held_out.src, kBos, kEos, kLen + 1);
      REQUIRE(decoded.size(1) == kLen + 2);  // bos + tokens + eos
      torch::Tensor predicted = decoded.narrow(1, 1, kLen + 1);
      accuracy = predicted.eq(held_out.tgt_out).to(torch::kDouble).mean().item<double>();
    }
  }
  INFO("held-out token accuracy " << accuracy);
  CHECK(accuracy >= 0.99);
}

TEST_CASE("padding in the source does not change the output and the decoder sees only the past") {
  torch::manual_seed(3);
  auto gen = at::detail::createCPUGenerator(7);
  Seq2SeqTransformer model(toy_options());
  model->eval();
  torch::NoGradGuard no_grad;
  Batch b = reverse_batch(3, gen);
  torch::Tensor padded = torch::cat({b.src, torch::full({3, 4}, kPad, torch::kInt64)}, 1);
  CHECK(torch::allclose(model(b.src, b.tgt_in), model(padded, b.tgt_in), 1e-5, 1e-5));

  // Changing a later target token leaves earlier positions' logits unchanged.
  torch::Tensor changed = b.tgt_in.clone();
  changed.select(1, 5).fill_(kFirstSymbol);
  torch::Tensor a = model(b.src, b.tgt_in), c = model(b.src, changed);
  CHECK(torch::allclose(a.narrow(1, 0, 5), c.narrow(1, 0, 5), 1e-5, 1e-5));
  CHECK_FALSE(torch::allclose(a.narrow(1, 5, 1), c.narrow(1, 5, 1), 1e-5, 1e-5));
}

TEST_CASE("sinusoidal positions and the causal mask follow the definitions") {
  torch::Tensor pe = sinusoidal_positions(10, 8);
  CHECK(pe[3][0].item<double>() == Approx(std::sin(3.0)));
  CHECK(pe[3][1].item<double>() == Approx(std::cos(3.0)));
  CHECK(pe[5][2].item<double>() == Approx(std::sin(5.0 / std::pow(10000.0, 2.0 / 8))));
  torch::Tensor m = causal_mask(3);
  CHECK(m[0][1].item<float>() == -INFINITY);
  CHECK(m[1][0].item<float>() == 0.0f);
  CHECK(m[2][2].item<float>() == 0.0f);
}

TEST_CASE("tied weights share the target embedding") {
  Seq2SeqTransformer tied(toy_options());
  auto keys = tied->named_parameters().keys();
  CHECK(std::find(keys.begin(), keys.end(), "generator_bias") != keys.end());
  CHECK(std::find(keys.begin(), keys.end(), "generator.weight") == keys.end());
  TransformerOptions o = toy_options();
  o.tie_weights = false;
  Seq2SeqTransformer untied(o);
  CHECK(untied->named_parameters().contains("generator.weight"));
}
