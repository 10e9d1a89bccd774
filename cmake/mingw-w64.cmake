# CMake toolchain: cross-compile snakepit_shm's core for 64-bit Windows with Debian's
# mingw-w64 (package g++-mingw-w64-x86-64), for the tests run under wine64.
#
#   cmake -S . -B _build/mingw -DCMAKE_TOOLCHAIN_FILE=cmake/mingw-w64.cmake
#
# The posix threads variant of the compiler is used because the core needs std::thread,
# std::mutex and std::shared_mutex (the win32 variant has none of them in GCC 12).
# Everything is linked statically (libgcc, libstdc++, winpthread), so the .exe needs no
# DLL that a fresh wine prefix lacks.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)

set(SPSHM_MINGW_TRIPLE x86_64-w64-mingw32)
find_program(CMAKE_C_COMPILER NAMES ${SPSHM_MINGW_TRIPLE}-gcc-posix ${SPSHM_MINGW_TRIPLE}-gcc REQUIRED)
find_program(CMAKE_CXX_COMPILER NAMES ${SPSHM_MINGW_TRIPLE}-g++-posix ${SPSHM_MINGW_TRIPLE}-g++ REQUIRED)
find_program(CMAKE_RC_COMPILER NAMES ${SPSHM_MINGW_TRIPLE}-windres)

set(CMAKE_FIND_ROOT_PATH /usr/${SPSHM_MINGW_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")
set(CMAKE_SHARED_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")
set(CMAKE_MODULE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")

