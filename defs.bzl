"""Compiler settings shared by every layer of the library, and the rule that
merges the layers into one static archive."""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")

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

def _static_library_impl(ctx):
    # Every archive under deps, each once: the PIC one where both were
    # built, so that the result also links into shared objects.
    archives = []
    for dep in ctx.attr.deps:
        for linker_input in dep[CcInfo].linking_context.linker_inputs.to_list():
            for lib in linker_input.libraries:
                archive = lib.pic_static_library or lib.static_library
                if archive and archive not in archives:
                    archives.append(archive)
    cc_toolchain = find_cpp_toolchain(ctx)
    out = ctx.actions.declare_file(ctx.label.name)

    # ar's MRI script copies every member of every archive, duplicate
    # names included, which extracting into one directory would not.
    mri = ctx.actions.declare_file(ctx.label.name + ".mri")
    ctx.actions.write(mri, "CREATE %s\n%sSAVE\nEND\n" % (
        out.path,
        "".join(["ADDLIB %s\n" % a.path for a in archives]),
    ))
    ctx.actions.run_shell(
        inputs = depset([mri] + archives, transitive = [cc_toolchain.all_files]),
        outputs = [out],
        command = "%s -M <%s" % (cc_toolchain.ar_executable, mri.path),
        mnemonic = "StaticLibrary",
        progress_message = "Merging %s" % out.short_path,
    )
    return [DefaultInfo(
        files = depset([out]),
        runfiles = ctx.runfiles(files = [out]),
    )]

# One static archive of every object of deps and of what they depend on
# (Bazel 4 has no cc_static_library): what an installed libkmv.a holds.
static_library = rule(
    implementation = _static_library_impl,
    attrs = {
        "deps": attr.label_list(providers = [CcInfo]),
        "_cc_toolchain": attr.label(
            default = Label("@bazel_tools//tools/cpp:current_cc_toolchain"),
        ),
    },
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    incompatible_use_toolchain_transition = True,
)
