/* Error names and messages, generated from the one X-macro in kmv.h so a new
 * code cannot be added without its message. Also the version queries. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "kmv/kmv.h"

#define KMV__STR2(x) #x
#define KMV__STR(x) KMV__STR2(x)

const char *kmv_version_string(void) {
    return KMV__STR(KMV_VERSION_MAJOR) "." KMV__STR(KMV_VERSION_MINOR) "." KMV__STR(
        KMV_VERSION_PATCH);
}

unsigned kmv_version_number(void) { return KMV_VERSION_NUMBER; }

const char *kmv_strerror(int code) {
    switch (code) {
#define KMV__ERRNO_MSG(name, value, msg) \
    case value:                          \
        return msg;
        KMV_ERRNO_MAP(KMV__ERRNO_MSG)
#undef KMV__ERRNO_MSG
    default:
        return "unknown error";
    }
}

const char *kmv_errname(int code) {
    switch (code) {
#define KMV__ERRNO_NAME(name, value, msg) \
    case value:                           \
        return "KMV_" #name;
        KMV_ERRNO_MAP(KMV__ERRNO_NAME)
#undef KMV__ERRNO_NAME
    default:
        return "KMV_UNKNOWN";
    }
}

const char *kmv_fallback_name(int reason) {
    switch (reason) {
    case KMV_FALLBACK_NONE: return "none";
    case KMV_FALLBACK_LSH: return "lsh";
    case KMV_FALLBACK_HEAVY: return "heavy";
    case KMV_FALLBACK_SAMPLES: return "samples";
    case KMV_FALLBACK_COLUMNS: return "columns";
    case KMV_FALLBACK_BUDGET: return "budget";
    case KMV_FALLBACK_SMALL: return "small";
    case KMV_FALLBACK_MEMORY: return "memory";
    case KMV_FALLBACK_TREE: return "tree";
    default: return "unknown";
    }
}
