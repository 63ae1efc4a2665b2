#!/usr/bin/env bash
# Prepares, on a Debian 12 machine with a package registry, what a GPU machine
# needs to build and test vitlab when it has PyTorch, CMake, nvcc and a
# compiler but no registry and none of vitlab's other development files:
#   .gpu/sysroot  Debian's yaml-cpp, fmt, nlohmann-json, CLI11, Catch2, zlib,
#                 libzip (with the bzip2 and OpenSSL libraries it links), libpng
#                 and libjpeg packages, extracted (headers, libraries, CMake
#                 configs; absolute symlinks made relative)
#   .gpu/opencv   a static OpenCV 4.6 (core, imgproc, imgcodecs with PNG and
#                 JPEG) built from Debian's source package
#   .gpu/fashion-mnist  the built-in dataset (tests and demos read it)
# About 45 MiB; carry `.gpu` to the GPU machine and run scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

packages=(libyaml-cpp-dev libyaml-cpp0.7 libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev catch2
          zlib1g-dev zlib1g libzip-dev libzip4 libbz2-1.0 libssl3 libpng-dev libpng16-16 libjpeg62-turbo-dev
          libjpeg62-turbo)
apt_opts=(-oDir::State::Lists="$work/lists" -oDir::Etc::SourceList="$work/sources.list" -oDir::Etc::SourceParts=/dev/null
          -oDebug::NoLocking=1 -oDir::Cache="$work/cache")
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sources.list" <<LIST
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
LIST
echo "gpu-prepare: fetching package lists"
apt-get "${apt_opts[@]}" update -qq

# The stamp names the packages: a changed list extracts the sysroot again.
if [ "$(cat "$DEST/sysroot/.done" 2>/dev/null)" != "${packages[*]}" ]; then
  rm -rf "$DEST/sysroot"
  mkdir -p "$DEST/sysroot" "$work/debs"
  (cd "$work/debs" && apt-get "${apt_opts[@]}" download -qq "${packages[@]}")
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST/sysroot"; done
  rm -rf "$DEST/sysroot/usr/share/doc" "$DEST/sysroot/usr/share/man" "$DEST/sysroot/usr/share/lintian"
  find "$DEST/sysroot" \( -name 'libz.a' -o -name 'libpng*.a' -o -name 'libjpeg.a' \) -delete  # linked shared
  # Debian's usrmerge layout puts some libraries in /lib: link them where
  # CMake and the linker look, and make every absolute symlink relative.
  find "$DEST/sysroot" -type l | while read -r link; do
    target=$(readlink "$link")
    [ "${target#/}" = "$target" ] && continue
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$DEST/sysroot$target")" "$link"
  done
  if [ -d "$DEST/sysroot/lib/x86_64-linux-gnu" ]; then
    for f in "$DEST"/sysroot/lib/x86_64-linux-gnu/*; do
      ln -sfn "../../../lib/x86_64-linux-gnu/$(basename "$f")" "$DEST/sysroot/usr/lib/x86_64-linux-gnu/$(basename "$f")"
    done
  fi
  echo "${packages[*]}" > "$DEST/sysroot/.done"
fi

if [ ! -f "$DEST/opencv/.done" ]; then
  echo "gpu-prepare: building a static OpenCV (core, imgproc, imgcodecs) from Debian's source; ~15 min on 2 cores"
  for p in libpng-dev libjpeg-dev zlib1g-dev; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -q installed || { echo "gpu-prepare: needs $p (make deps)"; exit 1; }
  done
  (cd "$work" && apt-get "${apt_opts[@]}" source --download-only -qq opencv && tar xf opencv_*.orig.tar.xz)
  src=$(ls -d "$work"/opencv-*/ | head -1)
  rm -rf "$DEST/opencv"
  cmake -S "$src" -B "$work/ocv-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$DEST/opencv" \
    -DBUILD_SHARED_LIBS=OFF -DBUILD_LIST=core,imgproc,imgcodecs -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
    -DWITH_PNG=ON -DWITH_JPEG=ON -DWITH_TIFF=OFF -DWITH_WEBP=OFF -DWITH_OPENJPEG=OFF -DWITH_JASPER=OFF \
    -DWITH_OPENEXR=OFF -DWITH_IMGCODEC_HDR=OFF -DWITH_IMGCODEC_SUNRASTER=OFF -DWITH_IMGCODEC_PXM=OFF \
    -DWITH_IMGCODEC_PFM=OFF -DWITH_GDAL=OFF -DWITH_GDCM=OFF -DWITH_IPP=OFF -DWITH_ITT=OFF -DWITH_OPENCL=OFF \
    -DWITH_TBB=OFF -DWITH_OPENMP=OFF -DWITH_EIGEN=OFF -DWITH_LAPACK=OFF -DWITH_PROTOBUF=OFF -DWITH_QUIRC=OFF \
    -DWITH_ADE=OFF -DWITH_VA=OFF -DWITH_GTK=OFF -DWITH_QT=OFF -DWITH_FFMPEG=OFF -DWITH_GSTREAMER=OFF -DWITH_V4L=OFF \
    -DWITH_1394=OFF -DWITH_CUDA=OFF -DWITH_VTK=OFF -DWITH_AVIF=OFF -DBUILD_ZLIB=OFF -DBUILD_PNG=OFF -DBUILD_JPEG=OFF \
    -DBUILD_TESTS=OFF -DBUILD_PERF_TESTS=OFF -DBUILD_EXAMPLES=OFF -DBUILD_opencv_apps=OFF -DBUILD_JAVA=OFF \
    -DBUILD_opencv_python3=OFF -DBUILD_DOCS=OFF -DOPENCV_GENERATE_PKGCONFIG=OFF -DCPU_BASELINE=SSE3 \
    -DCPU_DISPATCH=AVX,AVX2 > "$work/ocv-configure.log"
  cmake --build "$work/ocv-build" -j "$JOBS" > "$work/ocv-build.log" || { tail -30 "$work/ocv-build.log"; exit 1; }
  cmake --install "$work/ocv-build" > /dev/null
  rm -rf "$DEST/opencv/share" "$DEST/opencv/bin"
  strip --strip-debug "$DEST"/opencv/lib/*.a
  # The static libraries name this machine's libpng/libjpeg/zlib by absolute
  # path; point them at the sysroot's copies instead.
  sed -i 's#/usr/lib/x86_64-linux-gnu/#${_IMPORT_PREFIX}/../sysroot/usr/lib/x86_64-linux-gnu/#g' \
    "$DEST"/opencv/lib/cmake/opencv4/OpenCVModules*.cmake
  touch "$DEST/opencv/.done"
fi

rm -rf "$DEST/fashion-mnist"
cp -r /usr/share/datasets/fashion-mnist "$DEST/fashion-mnist"
echo "gpu-prepare: $(du -sh "$DEST" | cut -f1) in $DEST"
