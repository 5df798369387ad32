/* Replays fuzz inputs through a harness without libFuzzer, so that the
 * Bazel tests (plain, ASan, UBSan, with gcc) run every seed and every
 * crash input kept as regress-* in fuzz/corpus/NAME on each change.
 * Usage: replay FILE...   A harness detects a broken promise by aborting;
 * here that fails the test and the name of the input is on stderr. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "replay: no inputs\n");
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (f == NULL) {
            perror(argv[i]);
            return 1;
        }
        uint8_t *buf = malloc(1 << 20);
        size_t len = buf ? fread(buf, 1, 1 << 20, f) : 0;
        int err = buf == NULL || ferror(f) || !feof(f);
        fclose(f);
        if (err) {
            fprintf(stderr, "replay: cannot read %s whole\n", argv[i]);
            free(buf);
            return 1;
        }
        fprintf(stderr, "replay %s (%zu bytes)\n", argv[i], len);
        LLVMFuzzerTestOneInput(buf, len);
        free(buf);
    }
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
