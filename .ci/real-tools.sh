#!/usr/bin/env bash
# Build the clinic's real tools from ../shared/tools once per tarball, in a cache outside the clone,
# and print the `export` lines that point the real-tools tests at them (.ci/run evals them).
#   engine: moqui_rev-*.tar.gz, CPU build (cmake, g++, libgdcm-dev), with .ci/moqui-cpu-rng.hpp
#   interpreter: mqi_interpreter-*.tar.gz, in a venv of its own (numpy pydicom scipy openpyxl pyyaml)
# Prints nothing when the tarballs are not there: the real-tools tests then skip, naming the
# variables (and fail under CI=1, as .ci/run sets it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# The tarballs: $MQI_TOOLS_DIR, else ../shared/tools next to this clone, else next to the local
# repository it was cloned from (a clean clone made elsewhere).
tools=${MQI_TOOLS_DIR:-}
if [ -z "$tools" ]; then
  for repo in "$here/.." "$(git -C "$here" remote get-url origin 2>/dev/null || true)"; do
    if [ -n "$repo" ] && [ -d "$repo/../shared/tools" ]; then tools=$(cd "$repo/../shared/tools" && pwd); break; fi
  done
fi
cache=${MQI_TOOLS_CACHE:-/var/cache/mqi-tools}
[ -n "$tools" ] || exit 0
engine_tar=$(ls "$tools"/moqui_rev-*.tar.gz 2>/dev/null | head -n 1 || true)
interp_tar=$(ls "$tools"/mqi_interpreter-*.tar.gz 2>/dev/null | head -n 1 || true)
[ -n "$engine_tar" ] && [ -n "$interp_tar" ] || exit 0
mkdir -p "$cache"

key() { cat "$@" | sha256sum | cut -c1-16; }

engine="$cache/engine-$(key "$engine_tar" "$here/moqui-cpu-rng.hpp")"
if [ ! -x "$engine/moqui_rev/build/tps_env/tps_env" ]; then
  if ! command -v cmake >/dev/null || ! dpkg -s libgdcm-dev >/dev/null 2>&1 || ! command -v g++ >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake g++ libgdcm-dev >/dev/null 2>&1 \
      || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq && \
           DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake g++ libgdcm-dev >/dev/null; }
  fi
  rm -rf "$engine.part" && mkdir -p "$engine.part"
  tar xzf "$engine_tar" -C "$engine.part"
  src="$engine.part/moqui_rev"
  sed "s|@MQI_MATH_HPP@|$src/moqui/base/mqi_math.hpp|" "$here/moqui-cpu-rng.hpp" >"$engine.part/rng.hpp"
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=-include $engine.part/rng.hpp" \
    >"$engine.part/cmake.log" 2>&1 || { tail -n 30 "$engine.part/cmake.log" >&2; exit 1; }
  cmake --build "$src/build" -j "$(nproc)" >"$engine.part/build.log" 2>&1 \
    || { tail -n 30 "$engine.part/build.log" >&2; exit 1; }
  rm -rf "$engine" && mv "$engine.part" "$engine"  # the binary needs none of the build's paths
fi

interp="$cache/interpreter-$(key "$interp_tar")"
if [ ! -x "$interp/venv/bin/python" ] || [ ! -f "$interp/mqi_interpreter/main_cli.py" ]; then
  rm -rf "$interp" && mkdir -p "$interp"
  tar xzf "$interp_tar" -C "$interp"
  python3 -m venv "$interp/venv"
  "$interp/venv/bin/pip" install -q --disable-pip-version-check numpy pydicom scipy openpyxl pyyaml 2>&1 \
    | { grep -v "^WARNING: Location" || true; } >&2
fi

echo "export MQI_ENGINE_DIR='$engine/moqui_rev'"
echo "export MQI_INTERPRETER_DIR='$interp/mqi_interpreter'"
echo "export MQI_INTERPRETER_PYTHON='$interp/venv/bin/python'"
