/* kmv: the command-line tool, a thin layer over kmv/kmv.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <stdio.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "kmv/kmv.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kmv COMMAND [OPTIONS]\n"
            "\n"
            "Gaussian-kernel matrix-vector products and attention.\n"
            "Bandwidth convention: K_ij = exp(-||q_i - k_j||^2 / (2 sigma^2)).\n"
            "\n"
            "commands:\n"
            "  matvec      y = K x for keys, queries and x in .npy files\n"
            "  attention   D^-1 A V with A_ij = exp(<q_i, k_j> / sqrt(d))\n"
            "  prefix      Assumption A statistics and approximate vs exact Kx over\n"
            "              growing prefixes, from one stream (CSV, optional plot)\n"
            "  decode      run a llama2.c model token by token with kmv attention\n"
            "              streams; compare against exact attention\n"
            "  regress     least squares against exp(s A A^T) or powers of A^T A,\n"
            "              preconditioned, over kmv's products\n"
            "  demo        a tour on shipped data: the exact engine, attention and the\n"
            "              approximate engine on GloVe, then a stream's decoding steps\n"
            "\n"
            "kmv COMMAND --help describes a command; kmv --version prints the version.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return EXIT_OK;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("kmv %s\n", kmv_version_string());
        return EXIT_OK;
    }
    if (strcmp(cmd, "matvec") == 0) return cmd_matvec(argc - 2, argv + 2);
    if (strcmp(cmd, "attention") == 0) return cmd_attention(argc - 2, argv + 2);
    if (strcmp(cmd, "prefix") == 0) return cmd_prefix(argc - 2, argv + 2);
    if (strcmp(cmd, "decode") == 0) return cmd_decode(argc - 2, argv + 2);
    if (strcmp(cmd, "regress") == 0) return cmd_regress(argc - 2, argv + 2);
    if (strcmp(cmd, "demo") == 0) return cmd_demo(argc - 2, argv + 2, argv[0]);
    fprintf(stderr, "kmv: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return EXIT_USAGE;
}
