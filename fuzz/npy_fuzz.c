/* libFuzzer harness for the .npy reader: any bytes as a file.
 *
 * The reader takes a path, so the input goes into an in-memory file
 * (memfd) read through /proc/self/fd. Properties checked beyond "no crash,
 * no leak, no undefined behaviour": a success has a shape that fits the
 * bytes given, data for every element, and an error message; a failure
 * leaves the array empty and says why. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kmv/kmv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = memfd_create("npy", 0);
    if (fd < 0) abort();
    if (size && write(fd, data, size) != (ssize_t)size) abort();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    kmv_array a;
    char err[256] = "";
    int rc = kmv_npy_read(path, NULL, &a, err, sizeof err);
    close(fd);
    if (rc == KMV_OK) {
        /* Every element came from the input: shape * 4 bytes at least. */
        if (a.rows != 0 && a.cols > SIZE_MAX / a.rows) abort();
        size_t count = a.rows * a.cols;
        if (count > size / 4 + 1) abort();
        if (count && a.data == NULL) abort();
        volatile float sink = 0.0f;
        for (size_t i = 0; i < count; i++) sink += a.data[i];
        (void)sink;
        kmv_array_free(&a);
    } else {
        if (err[0] == '\0') abort();
        if (strcmp(kmv_strerror(rc), "unknown error") == 0) abort();
    }
    return 0;
}
