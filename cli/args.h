/* Command-line options for the kmv tool: a declared table per command, so
 * that help text, parsing and checks cannot disagree. */
#ifndef KMV_CLI_ARGS_H
#define KMV_CLI_ARGS_H

#include <stddef.h>
#include <stdint.h>

#include "kmv/kmv.h"

/* Exit statuses of the tool. */
enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2 };

typedef enum { OPT_FLAG, OPT_STRING, OPT_DOUBLE, OPT_INT, OPT_U64 } opt_type;

typedef struct opt {
    const char *name;  /* without the leading "--" */
    opt_type type;
    int required;
    const char *arg;   /* placeholder shown in help, e.g. "Q.npy" */
    const char *help;
    /* Filled by args_parse. */
    int seen;
    const char *s;
    double d;
    long long i;
    uint64_t u;
} opt;

/* Parse argv[0..argc) (after the command name) against opts[0..n).
 * Accepts "--name value" and "--name=value". On a usage error prints a
 * message naming the command and option to stderr and returns EXIT_USAGE;
 * "--help" prints help and returns -1; otherwise EXIT_OK. */
int args_parse(const char *cmd, const char *summary, opt *opts, size_t n, int argc,
               char **argv);

/* Help for one command on stdout. */
void args_help(const char *cmd, const char *summary, const opt *opts, size_t n);

/* The option called name; it must exist in the table. */
opt *args_get(opt *opts, size_t n, const char *name);

/* Set p's eps, delta, seed and n_threads from whichever of --eps, --delta,
 * --seed and --threads the table holds and the user gave, and check eps,
 * delta and the thread count. Returns EXIT_OK, or EXIT_USAGE after a
 * message naming the option. */
int args_common_params(const char *cmd, opt *opts, size_t n, kmv_params *p);

#endif /* KMV_CLI_ARGS_H */
