"""The headers of Debian's /usr/bin/python3, for the Python extension.

A repository rule that only looks at this machine: it asks /usr/bin/python3
(the interpreter the package is for) where its C headers are and links them
in. Nothing is downloaded. python3-dev provides the headers
(scripts/install-deps installs it)."""

def _local_python_impl(ctx):
    python = ctx.path("/usr/bin/python3")
    if not python.exists:
        fail("kmv: /usr/bin/python3 not found: run scripts/install-deps")
    res = ctx.execute([python, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"])
    if res.return_code != 0:
        fail("kmv: /usr/bin/python3 cannot report its include directory: " + res.stderr)
    include = res.stdout.strip()
    if not ctx.path(include + "/Python.h").exists:
        fail("kmv: " + include + "/Python.h is missing: install python3-dev (scripts/install-deps)")
    ctx.symlink(include, "include")
    ctx.file("BUILD", """
cc_library(
    name = "headers",
    hdrs = glob(["include/**/*.h"]),
    includes = ["include"],
    visibility = ["//visibility:public"],
)
""")

local_python = repository_rule(
    implementation = _local_python_impl,
    local = True,
)
