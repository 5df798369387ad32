"""Compiler settings shared by every layer of the library."""

# -fvisibility=hidden: a shared build exports the KMV_API symbols of
# kmv/kmv.h and kmv/kmv_experimental.h and nothing else.
KMV_COPTS = [
    "-O2",
    "-fopenmp",
    "-fvisibility=hidden",
]

# Who may see each layer: only the layers above it, and the tests and fuzz
# harnesses, which check internals.
CHECKERS = [
    "//fuzz:__pkg__",
    "//tests:__pkg__",
]
