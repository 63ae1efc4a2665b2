// Default sanitizer settings of the VITLAB_SANITIZE build, linked into each
// executable; ASAN_OPTIONS, UBSAN_OPTIONS and LSAN_OPTIONS still override them.
extern "C" {

const char* __asan_default_options() { return "print_suppressions=0"; }

const char* __ubsan_default_options() { return "print_stacktrace=1:halt_on_error=1"; }

// Third-party leaks only. LibTorch 1.13's PyTorchStreamReader leaks miniz's
// archive state when its constructor throws on a damaged zip (the destructor
// that would free it never runs); LibTorch has no frame pointers, so the
// report holds just its own frame, and the library is the only handle.
const char* __lsan_default_suppressions() { return "leak:libtorch_cpu.so\n"; }

}  // extern "C"
