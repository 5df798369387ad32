/* Command-line options for the kmv tool: a declared table per command, so
 * that help text, parsing, checks and the file rules cannot disagree. */
#ifndef KMV_CLI_ARGS_H
#define KMV_CLI_ARGS_H

#include <stddef.h>
#include <stdint.h>

#define KMV_STATIC_LINKING_ONLY /* --force-approx, --empirical */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

/* Exit statuses of the tool. */
enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2 };

typedef enum { OPT_FLAG, OPT_STRING, OPT_DOUBLE, OPT_INT, OPT_U64 } opt_type;

/* What a string option names: a file read, a file written, or neither.
 * Outputs are checked against inputs and each other before any work
 * (cli/io.h, io_outputs_open()). */
typedef enum { ROLE_NONE, ROLE_INPUT, ROLE_OUTPUT } opt_role;

typedef struct opt {
    const char *name;  /* without the leading "--" */
    opt_type type;
    int required;
    opt_role role;
    int experimental;  /* listed apart in the help: for measurements */
    const char *arg;   /* placeholder shown in help, e.g. "Q.npy" */
    const char *help;
    /* Filled by args_parse. */
    int seen;
    const char *s;
    double d;
    long long i;
    uint64_t u;
} opt;

/* Table entries. */
#define OPTION(nm, ty, ar, hl) {.name = (nm), .type = (ty), .arg = (ar), .help = (hl)}
#define REQUIRED(nm, ty, ar, hl) \
    {.name = (nm), .type = (ty), .required = 1, .arg = (ar), .help = (hl)}
#define FLAG(nm, hl) {.name = (nm), .type = OPT_FLAG, .arg = "", .help = (hl)}
#define EXPERIMENTAL_FLAG(nm, hl) \
    {.name = (nm), .type = OPT_FLAG, .experimental = 1, .arg = "", .help = (hl)}
#define INPUT(nm, req, ar, hl) \
    {.name = (nm), .type = OPT_STRING, .required = (req), .role = ROLE_INPUT, .arg = (ar), .help = (hl)}
#define OUTPUT(nm, req, ar, hl) \
    {.name = (nm), .type = OPT_STRING, .required = (req), .role = ROLE_OUTPUT, .arg = (ar), .help = (hl)}

/* The options several commands share, defined once. */
#define OPT_EPS OPTION("eps", OPT_DOUBLE, "E", "target error eps, in (0, 1) (default 0.1)")
#define OPT_DELTA OPTION("delta", OPT_DOUBLE, "P", "failure probability, in (0, 1) (default 0.01)")
#define OPT_SEED OPTION("seed", OPT_U64, "N", "random seed (default 1)")
#define OPT_THREADS OPTION("threads", OPT_INT, "T", "threads, 0 = all cores (default 0)")
#define OPT_MAX_MB OPTION("max-mb", OPT_DOUBLE, "MB", "cap on the engine's memory, MiB (default none)")
#define OPT_EXACT FLAG("exact", "use the exact engine")
#define OPT_MEASURE_ERROR FLAG("measure-error", "also run exact; report the error in the stats")
#define OPT_FORCE_APPROX                                                               \
    EXPERIMENTAL_FLAG("force-approx", "run the approximate path even where the cost " \
                                      "model would run exact (same guarantee)")
#define OPT_EMPIRICAL                                                                 \
    EXPERIMENTAL_FLAG("empirical", "size samples by their own variance (the paper's " \
                                   "A.1.4; no error bound)")

#define OPT_BACKEND                                                                     \
    OPTION("backend", OPT_STRING, "NAME",                                               \
           "auto (default: the cost model picks), tree (certified bounds), lsh (the " \
           "paper's tables and sampling)")
#define OPT_VERIFY_EVERY                                                          \
    OPTION("verify-every", OPT_INT, "N",                                          \
           "also compute every N-th row exactly; the stats report the errors seen")

/* Parse argv[0..argc) (after the command name) against opts[0..n).
 * Accepts "--name value" and "--name=value". On a usage error prints a
 * message naming the command and option to stderr and returns EXIT_USAGE;
 * "--help" prints help and returns -1; otherwise EXIT_OK. */
int args_parse(const char *cmd, const char *summary, opt *opts, size_t n, int argc,
               char **argv);

/* Help for one command on stdout: a usage line, the summary, the options,
 * then the experimental ones under their own heading. */
void args_help(const char *cmd, const char *summary, const opt *opts, size_t n);

/* The option called name; it must exist in the table. */
opt *args_get(opt *opts, size_t n, const char *name);

/* Whether the table has an option called name and the user gave it. */
int args_seen(opt *opts, size_t n, const char *name);

/* Set p from whichever of --eps, --delta, --seed, --threads, --max-mb,
 * --exact, --measure-error, --force-approx, --empirical, --backend and
 * --verify-every the table holds
 * and the user gave, and check their ranges. Returns EXIT_OK, or
 * EXIT_USAGE after a message naming the option. */
int args_common_params(const char *cmd, opt *opts, size_t n, kmv_params *p);

#endif /* KMV_CLI_ARGS_H */
