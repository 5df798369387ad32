#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "cli/args.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

opt *args_get(opt *opts, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return &opts[i];
    return NULL;
}

int args_seen(opt *opts, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return opts[i].seen;
    return 0;
}

int args_common_params(const char *cmd, opt *opts, size_t n, kmv_params *p) {
    opt *v;
    if ((v = args_get(opts, n, "eps")) != NULL && v->seen) p->eps = v->d;
    if ((v = args_get(opts, n, "delta")) != NULL && v->seen) p->delta = v->d;
    if ((v = args_get(opts, n, "seed")) != NULL && v->seen) p->seed = v->u;
    if ((v = args_get(opts, n, "threads")) != NULL && v->seen) {
        if (v->i < 0 || v->i > 4096) {
            fprintf(stderr, "kmv %s: --threads must be in [0, 4096]\n", cmd);
            return EXIT_USAGE;
        }
        p->n_threads = (int)v->i;
    }
    if (!(p->eps > 0 && p->eps < 1)) {
        fprintf(stderr, "kmv %s: --eps must be in (0, 1)\n", cmd);
        return EXIT_USAGE;
    }
    if (!(p->delta > 0 && p->delta < 1)) {
        fprintf(stderr, "kmv %s: --delta must be in (0, 1)\n", cmd);
        return EXIT_USAGE;
    }
    if ((v = args_get(opts, n, "max-mb")) != NULL && v->seen) {
        if (!(v->d > 0 && v->d <= 1e12)) {
            fprintf(stderr, "kmv %s: --max-mb must be in (0, 1e12]\n", cmd);
            return EXIT_USAGE;
        }
        p->max_bytes = (size_t)(v->d * 1048576.0);
        if (p->max_bytes == 0) p->max_bytes = 1; /* 0 would mean no cap */
    }
    p->exact = args_seen(opts, n, "exact");
    p->measure_error = args_seen(opts, n, "measure-error");
    kmv_params_x x;
    kmv_params_get_x(p, &x);
    x.force_approx = args_seen(opts, n, "force-approx");
    if (args_seen(opts, n, "empirical")) x.attn_budget = KMV_BUDGET_EMPIRICAL;
    if ((v = args_get(opts, n, "backend")) != NULL && v->seen) {
        if (!strcmp(v->s, "auto")) x.backend = KMV_BACKEND_AUTO;
        else if (!strcmp(v->s, "tree")) x.backend = KMV_BACKEND_TREE;
        else if (!strcmp(v->s, "lsh")) x.backend = KMV_BACKEND_LSH;
        else {
            fprintf(stderr, "kmv %s: --backend must be auto, tree or lsh\n", cmd);
            return EXIT_USAGE;
        }
    }
    if ((v = args_get(opts, n, "verify-every")) != NULL && v->seen) {
        if (v->i < 1 || v->i > INT_MAX) {
            fprintf(stderr, "kmv %s: --verify-every must be in [1, %d]\n", cmd, INT_MAX);
            return EXIT_USAGE;
        }
        x.verify_every = (int)v->i;
    }
    kmv_params_set_x(p, &x);
    return EXIT_OK;
}

static void help_usage(const opt *o) {
    printf(o->required ? " --%s" : " [--%s", o->name);
    if (o->type != OPT_FLAG) printf(" %s", o->arg);
    if (!o->required) printf("]");
}

static void help_line(const opt *o) {
    char left[64];
    snprintf(left, sizeof left, "--%s%s%s", o->name, o->type == OPT_FLAG ? "" : " ",
             o->type == OPT_FLAG ? "" : o->arg);
    printf("  %-22s %s\n", left, o->help);
}

void args_help(const char *cmd, const char *summary, const opt *opts, size_t n) {
    printf("usage: kmv %s", cmd);
    for (int exp = 0; exp < 2; exp++)
        for (size_t i = 0; i < n; i++)
            if (opts[i].experimental == exp) help_usage(&opts[i]);
    printf("\n\n%s\n\noptions:\n", summary);
    for (size_t i = 0; i < n; i++)
        if (!opts[i].experimental) help_line(&opts[i]);
    printf("  %-22s %s\n", "--help", "show this help");
    int any = 0;
    for (size_t i = 0; i < n; i++) {
        if (!opts[i].experimental) continue;
        if (!any++) printf("\nexperimental options (for measurements; may change):\n");
        help_line(&opts[i]);
    }
    for (size_t i = 0; i < n; i++) {
        if (opts[i].role != ROLE_OUTPUT) continue;
        printf("\nOutputs appear whole or not at all and never replace an input; '-' is\n"
               "standard output; devices and pipes are written directly (README, Outputs).\n");
        break;
    }
}

/* Strict numeric parsing: the whole string must be the number, so "1e" or
 * "0.1x" is an error rather than a silently different value. */
static int parse_value(opt *o, const char *cmd, const char *v) {
    char *end;
    errno = 0;
    switch (o->type) {
    case OPT_STRING: /* a file's name is never empty; a text may be */
        if (*v == '\0' && o->role != ROLE_NONE) goto bad;
        o->s = v;
        return 0;
    case OPT_DOUBLE:
        o->d = strtod(v, &end);
        if (*v == '\0' || *end != '\0' || errno != 0 || !isfinite(o->d)) goto bad;
        return 0;
    case OPT_INT:
        o->i = strtoll(v, &end, 10);
        if (*v == '\0' || *end != '\0' || errno != 0) goto bad;
        return 0;
    case OPT_U64:
        if (*v == '-') goto bad;
        o->u = (uint64_t)strtoull(v, &end, 0);
        if (*v == '\0' || *end != '\0' || errno != 0) goto bad;
        return 0;
    case OPT_FLAG:
        break;
    }
bad:
    fprintf(stderr, "kmv %s: invalid value '%s' for --%s\n", cmd, v, o->name);
    return EXIT_USAGE;
}

int args_parse(const char *cmd, const char *summary, opt *opts, size_t n, int argc,
               char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            args_help(cmd, summary, opts, n);
            return -1;
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "kmv %s: unexpected argument '%s' (see kmv %s --help)\n", cmd, a, cmd);
            return EXIT_USAGE;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        opt *o = NULL;
        for (size_t k = 0; k < n; k++)
            if (strlen(opts[k].name) == len && strncmp(opts[k].name, name, len) == 0) o = &opts[k];
        if (o == NULL) {
            fprintf(stderr, "kmv %s: unknown option '%.*s' (see kmv %s --help)\n", cmd,
                    (int)(len + 2), a, cmd);
            return EXIT_USAGE;
        }
        if (o->seen) {
            fprintf(stderr, "kmv %s: --%s given twice\n", cmd, o->name);
            return EXIT_USAGE;
        }
        o->seen = 1;
        if (o->type == OPT_FLAG) {
            if (eq) {
                fprintf(stderr, "kmv %s: --%s takes no value\n", cmd, o->name);
                return EXIT_USAGE;
            }
            continue;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (v == NULL) {
            fprintf(stderr, "kmv %s: --%s needs a value (%s)\n", cmd, o->name, o->arg);
            return EXIT_USAGE;
        }
        int rc = parse_value(o, cmd, v);
        if (rc != 0) return rc;
    }
    for (size_t k = 0; k < n; k++) {
        if (opts[k].required && !opts[k].seen) {
            fprintf(stderr, "kmv %s: missing --%s %s (see kmv %s --help)\n", cmd, opts[k].name,
                    opts[k].arg, cmd);
            return EXIT_USAGE;
        }
    }
    (void)summary;
    return EXIT_OK;
}
