#pragma once

// VITLAB_ASAN: defined when built with AddressSanitizer (GCC or clang).
#if defined(__SANITIZE_ADDRESS__)
#define VITLAB_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define VITLAB_ASAN 1
#endif
#endif
