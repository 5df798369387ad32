"""Compiler settings shared by every layer of the library."""

# -fvisibility=hidden: a shared build exports the KMV_API symbols of
# kmv/kmv.h and kmv/kmv_experimental.h and nothing else. The fuzzing build
# (clang, .bazelrc's config fuzz) leaves OpenMP out: libFuzzer drives one
# call at a time, and clang's OpenMP runtime is not among the packages.
KMV_COPTS = [
    "-O2",
    "-fvisibility=hidden",
] + select({
    "//:fuzzing": ["-Wno-unknown-pragmas"],
    "//conditions:default": ["-fopenmp"],
})

# Who may see each layer: only the layers above it, and the tests and fuzz
# harnesses, which check internals.
CHECKERS = [
    "//fuzz:__pkg__",
    "//tests:__pkg__",
]
