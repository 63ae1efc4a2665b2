# `cmake --install`: the vitlab executable, the libraries (static), their
# headers under include/vitlab/<folder>/ (included as "models/registry.h",
# as in the source tree) and the CMake package vitlab, whose vitlab::vitlab
# links every library and finds their dependencies again.
include(CMakePackageConfigHelpers)

set(_package_dir ${CMAKE_INSTALL_LIBDIR}/cmake/vitlab)
set(_libraries "")
# From the top down, as a static link line lists them.
foreach(folder IN ITEMS bench study analysis train eval plot data models io kernels common)
  set_target_properties(vitlab_${folder} PROPERTIES EXPORT_NAME ${folder})
  list(APPEND _libraries vitlab_${folder})
  file(GLOB _headers CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/${folder}/*.h)
  install(FILES ${_headers} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/vitlab/${folder})
endforeach()
# vitlab_io links it privately, which a static library passes on to its users.
set_target_properties(vitlab_libzip PROPERTIES EXPORT_NAME libzip)

add_library(vitlab_all INTERFACE)
set_target_properties(vitlab_all PROPERTIES EXPORT_NAME vitlab)
# OpenMP: at::parallel_for runs in parallel only in code compiled with it
# (see find_package(OpenMP) in the root CMakeLists.txt).
target_link_libraries(vitlab_all INTERFACE ${_libraries} OpenMP::OpenMP_CXX)
if(VITLAB_SANITIZE)
  # Sanitized libraries need the sanitizer runtimes in whatever links them.
  target_link_options(vitlab_all INTERFACE -fsanitize=address,undefined)
endif()
# The same name for a project that adds vitlab with add_subdirectory().
add_library(vitlab::vitlab ALIAS vitlab_all)

install(TARGETS ${_libraries} vitlab_libzip vitlab_all EXPORT vitlabTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
# The installed executable finds its libraries where the build found them:
# the directories outside the project, and LibTorch's, which the PyPI wheel
# in the project's .venv/ is not.
set_target_properties(vitlab PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)
get_filename_component(_torch_lib_dir "${TORCH_LIBRARY}" DIRECTORY)
if(NOT _torch_lib_dir IN_LIST CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES)
  set_target_properties(vitlab PROPERTIES INSTALL_RPATH "${_torch_lib_dir}")
endif()
install(TARGETS vitlab RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

install(EXPORT vitlabTargets NAMESPACE vitlab:: DESTINATION ${_package_dir})
configure_package_config_file(cmake/vitlabConfig.cmake.in ${PROJECT_BINARY_DIR}/vitlabConfig.cmake
                              INSTALL_DESTINATION ${_package_dir})
# 0.x: a minor version may change the API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/vitlabConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/vitlabConfig.cmake ${PROJECT_BINARY_DIR}/vitlabConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/vitlabTorch.cmake DESTINATION ${_package_dir})
