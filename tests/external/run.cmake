# The external_project test: installs a vitlab build into a prefix, builds
# this folder's project against it as a user would (find_package(vitlab),
# vitlab::vitlab) and runs it on the test fixtures. Also checks that the
# README's C++ example is main.cpp, so that the example compiles.
#
#   cmake -DBUILD=<vitlab build> -DWORK=<folder> -DPREFIX_PATH=<LibTorch's CMAKE_PREFIX_PATH>
#         -DCXX=<compiler> -DGENERATOR=<generator> -P run.cmake
#
# WORK keeps the prefix and the example's build between runs: an unchanged
# install leaves the headers' times, and the example is not compiled again.
cmake_minimum_required(VERSION 3.25)
set(_source ${CMAKE_CURRENT_LIST_DIR})
get_filename_component(_root ${_source}/../.. ABSOLUTE)

# Runs one step, showing its output only when it fails.
function(run_step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "external_project: ${name} failed (${status}):\n${output}")
  endif()
  message(STATUS "external_project: ${name}: done")
endfunction()

file(READ ${_source}/main.cpp _example)
file(READ ${_root}/README.md _readme)
string(FIND "${_readme}" "${_example}" _at)
if(_at EQUAL -1)
  message(FATAL_ERROR "external_project: README.md's C++ example differs from ${_source}/main.cpp; "
                      "the README shows that file whole")
endif()

run_step(install ${CMAKE_COMMAND} --install ${BUILD} --prefix ${WORK}/prefix)
# Escaped, so that the list stays one argument through run_step.
string(REPLACE ";" "\\;" _prefix_path "${WORK}/prefix;${PREFIX_PATH}")
run_step(configure ${CMAKE_COMMAND} -S ${_source} -B ${WORK}/build -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release
         -DCMAKE_CXX_COMPILER=${CXX} "-DCMAKE_PREFIX_PATH=${_prefix_path}")
run_step(build ${CMAKE_COMMAND} --build ${WORK}/build -j 2)
run_step(run ${WORK}/build/vitlab_example ${_root}/tests/fixtures)
