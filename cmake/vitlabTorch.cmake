# What code built on a LibTorch needs beyond Torch's CMake package, for the
# build and for the installed package (vitlabConfig.cmake) alike. Both
# functions read TORCH_INSTALL_PREFIX, which find_package(Torch) sets.

# PyPI's CUDA wheel was built against the NVIDIA libraries installed beside
# it (site-packages/nvidia/*/lib: CUDA 13.2, NCCL 2.30), which its libraries
# find through their RPATH at run time. The linker is told where they are,
# or it takes the CUDA toolkit's older NCCL and fails on symbols it lacks,
# and executables look there first, before the toolkit's older runtime.
# Sets <out> to those link options (none for another LibTorch).
function(vitlab_torch_link_options out)
  set(options "")
  file(GLOB dirs "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
  foreach(dir IN LISTS dirs)
    get_filename_component(dir "${dir}" REALPATH)
    list(APPEND options "LINKER:-rpath-link,${dir}" "LINKER:-rpath,${dir}")
  endforeach()
  set(${out} "${options}" PARENT_SCOPE)
endfunction()

# A pip-installed LibTorch ships its own fmt headers, of another major
# version than the libfmt linked here: the linked one's headers go first.
# GCC ignores -isystem /usr/include (a standard directory, searched after
# every -isystem one), so Debian's are put first through a link in
# <link_dir>. Sets <out> to the directory to search first, or to "" when
# LibTorch has no fmt headers.
function(vitlab_fmt_include_dir out link_dir)
  set(${out} "" PARENT_SCOPE)
  if(NOT EXISTS "${TORCH_INSTALL_PREFIX}/include/fmt")
    return()
  endif()
  get_target_property(include fmt::fmt INTERFACE_INCLUDE_DIRECTORIES)
  if(include STREQUAL "/usr/include")
    file(MAKE_DIRECTORY ${link_dir})
    file(CREATE_LINK /usr/include/fmt ${link_dir}/fmt SYMBOLIC)
    set(include ${link_dir})
  endif()
  set(${out} "${include}" PARENT_SCOPE)
endfunction()
