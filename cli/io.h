/* File handling for the kmv tool: loading checked inputs, writing outputs
 * that appear whole or not at all. Messages go to stderr, naming the file. */
#ifndef KMV_CLI_IO_H
#define KMV_CLI_IO_H

#include "kmv/kmv.h"

/* Read a .npy file as a float32 matrix; what names its role in messages
 * ("queries", "keys", ...). A 1-D file is refused unless allow_1d. NaN or
 * infinity is refused with its row and column. Returns 0 or EXIT_FAIL. */
int io_load(const char *cmd, const char *path, const char *what, int allow_1d, kmv_array *out);

/* Write text to a synced temporary file beside path, to be renamed into
 * place by io_commit() or removed by io_discard(): a run can stage one file,
 * write another, and publish both or neither. *staged receives the
 * temporary's name. Returns 0 or EXIT_FAIL (message printed, nothing left). */
int io_stage_text(const char *cmd, const char *path, const char *text, size_t len,
                  char **staged);

/* Rename a staged file over path and sync the directory; frees *staged.
 * Returns 0 or EXIT_FAIL (message printed, the temporary removed). */
int io_commit(const char *cmd, char **staged, const char *path);

/* Remove a staged file that will not be published; frees *staged. */
void io_discard(char **staged);

/* Find a file shipped in the repository's data/ folder: $KMV_DATA_DIR, then
 * ./data, then the Bazel runfiles beside the binary. Returns 0 and fills
 * out, or EXIT_FAIL after saying where it looked. */
int io_find_data(const char *cmd, const char *argv0, const char *name, char *out, size_t len);

#endif /* KMV_CLI_IO_H */
