/* File handling for the kmv tool: loading checked inputs, writing outputs
 * that appear whole or not at all. Messages go to stderr, naming the file. */
#ifndef KMV_CLI_IO_H
#define KMV_CLI_IO_H

#include "kmv/kmv.h"

/* Read a .npy file as a float32 matrix; what names its role in messages
 * ("queries", "keys", ...). A 1-D file is refused unless allow_1d. NaN or
 * infinity is refused with its row and column. Returns 0 or EXIT_FAIL. */
int io_load(const char *cmd, const char *path, const char *what, int allow_1d, kmv_array *out);

/* Write text to path through a synced temporary file and a rename.
 * Returns 0 or EXIT_FAIL (message printed, no file left behind). */
int io_write_text(const char *cmd, const char *path, const char *text, size_t len);

/* Find a file shipped in the repository's data/ folder: $KMV_DATA_DIR, then
 * ./data, then the Bazel runfiles beside the binary. Returns 0 and fills
 * out, or EXIT_FAIL after saying where it looked. */
int io_find_data(const char *cmd, const char *argv0, const char *name, char *out, size_t len);

#endif /* KMV_CLI_IO_H */
