/* File handling for the kmv tool: loading checked inputs, and outputs that
 * appear whole or not at all, never over an input. Messages go to stderr,
 * naming the file. */
#ifndef KMV_CLI_IO_H
#define KMV_CLI_IO_H

#include <stddef.h>

#include "cli/args.h"
#include "kmv/kmv.h"

/* Read a .npy file as a float32 matrix; what names its role in messages
 * ("queries", "keys", ...). A 1-D file is refused unless allow_1d. NaN or
 * infinity is refused with its row and column. Returns 0 or EXIT_FAIL. */
int io_load(const char *cmd, const char *path, const char *what, int allow_1d, kmv_array *out);

/* The most output options one command has. */
#define IO_MAX_OUTPUTS 4

/* A command's outputs: every option of role ROLE_OUTPUT the user gave, in
 * table order, each open (kmv_output_open()) until committed or dropped. */
typedef struct io_outputs {
    const char *cmd;
    size_t n;
    const opt *opt[IO_MAX_OUTPUTS];
    kmv_output *out[IO_MAX_OUTPUTS];
    int slot[IO_MAX_OUTPUTS]; /* in the signal handler's list, or -1 */
} io_outputs;

/* Refuse (EXIT_USAGE, naming both paths, nothing touched) an output that
 * is the same file as one of the table's inputs or as another output (same
 * device and inode, or for a file not there yet the same path once links
 * are followed), and '-' or /dev/stdout when standard output is a
 * terminal. Returns EXIT_OK or EXIT_USAGE (message printed). */
int io_outputs_check(const char *cmd, const opt *opts, size_t n);

/* Before any work: refuse (EXIT_USAGE, naming both paths, nothing touched)
 * an output that is the same file as one of the table's inputs or as
 * another output (same device and inode, or for a file not there yet the
 * same path once links are followed), and '-' or /dev/stdout when standard
 * output is a terminal; then open every output (temporary files made
 * beside their targets, so a missing or read-only directory fails now,
 * EXIT_FAIL). Until io_outputs_commit() or io_outputs_discard(), SIGINT,
 * SIGTERM, SIGHUP and SIGPIPE remove the temporary files before the
 * signal's usual effect. Returns EXIT_OK, EXIT_USAGE or EXIT_FAIL (message
 * printed, nothing left behind). */
int io_outputs_open(const char *cmd, const opt *opts, size_t n, io_outputs *o);

/* The open output of option name, or NULL when it was not given. */
kmv_output *io_output(const io_outputs *o, const char *name);

/* Whether some output goes to the process's standard output. */
int io_outputs_use_stdout(const io_outputs *o);

/* Write to the output of option name (which must be open): bytes, or a
 * float32 .npy array. Returns 0 or EXIT_FAIL (message printed). */
int io_write(const io_outputs *o, const char *name, const void *data, size_t len);
int io_write_npy(const io_outputs *o, const char *name, const float *data, int ndim,
                 size_t rows, size_t cols);

/* Publish every output, in table order; after a failure the rest are
 * dropped. Returns 0 or EXIT_FAIL (message printed). */
int io_outputs_commit(io_outputs *o);

/* Drop every output still open (temporary files removed); safe to call
 * after io_outputs_commit() and on a zeroed struct. */
void io_outputs_discard(io_outputs *o);

/* Find a file shipped in the repository's data/ folder: $KMV_DATA_DIR, then
 * ./data, then the Bazel runfiles beside the binary. Returns 0 and fills
 * out, or EXIT_FAIL after saying where it looked. */
int io_find_data(const char *cmd, const char *argv0, const char *name, char *out, size_t len);

#endif /* KMV_CLI_IO_H */
