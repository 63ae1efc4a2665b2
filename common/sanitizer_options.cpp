// Default sanitizer settings of the VITLAB_SANITIZE build, linked into each
// executable; UBSAN_OPTIONS still overrides them.
extern "C" {

const char* __ubsan_default_options() { return "print_stacktrace=1:halt_on_error=1"; }

}  // extern "C"
