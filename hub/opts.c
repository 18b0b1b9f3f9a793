#define _GNU_SOURCE   /* program_invocation_short_name */
#include "hub/opts.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/util.h"

static int fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return -1;
}

/* the row named name[0..len), or NULL; headings are never found */
static const struct opt *find(const struct opt *t, size_t n, const char *name, size_t len)
{
	for (size_t i = 0; i < n; i++)
		if (t[i].name && strlen(t[i].name) == len && !strncmp(t[i].name, name, len))
			return &t[i];
	return NULL;
}

/* "<origin>: name" or "--name" */
static void who(char *out, size_t outlen, const struct opt *o, const char *origin)
{
	if (origin)
		snprintf(out, outlen, "%s: %s", origin, o->name);
	else
		snprintf(out, outlen, "--%s", o->name);
}

/* checks val against o, stores it (val NULL: an OPT_STR is unset) and runs
 * o->fn; 0 or -1 with "<origin>: <name> must be ..." in err */
static int set(const struct opt *o, void *obj, const char *val, const char *origin,
	       char *err, size_t errlen)
{
	char *p = o->off == OPT_NO_FIELD ? NULL : (char *)obj + o->off, *end, w[300];

	who(w, sizeof(w), o, origin);
	switch (o->type) {
	case OPT_STR:
		if (p) {
			char **s = (char **)(void *)p;
			free(*s);
			*s = val ? hub_xstrdup(val) : NULL;
		}
		break;
	case OPT_INT:
	case OPT_LONG:
	case OPT_UINT: {
		errno = 0;
		long long v = strtoll(val, &end, 10);
		if (errno || end == val || *end || (double)v < o->min || (double)v > o->max)
			return fail(err, errlen, "%s must be an integer in [%.0f, %.0f], got \"%s\"",
				    w, o->min, o->max, val);
		if (p && o->type == OPT_INT)
			*(int *)(void *)p = (int)v;
		else if (p && o->type == OPT_UINT)
			*(unsigned *)(void *)p = (unsigned)v;
		else if (p)
			*(long *)(void *)p = (long)v;
		break;
	}
	case OPT_U64: {
		errno = 0;
		unsigned long long v = isdigit((unsigned char)*val) ? strtoull(val, &end, 10) : 0;
		if (!isdigit((unsigned char)*val) || errno || *end || (double)v < o->min ||
		    (double)v > o->max)
			return fail(err, errlen, "%s must be an integer in [%.0f, %.0f], got \"%s\"",
				    w, o->min, o->max, val);
		if (p)
			*(uint64_t *)(void *)p = v;
		break;
	}
	case OPT_DBL: {
		errno = 0;
		double v = strtod(val, &end);
		if (errno || end == val || *end || v != v || v < o->min || v > o->max)
			return fail(err, errlen, "%s must be a number in [%g, %g], got \"%s\"",
				    w, o->min, o->max, val);
		if (p)
			*(double *)(void *)p = v;
		break;
	}
	case OPT_FLAG:
		if (p)
			*(int *)(void *)p = 1;
		break;
	}
	return o->fn ? o->fn(obj, o, val, err, errlen) : 0;
}

int opts_defaults(const struct opt *t, size_t n, void *obj, char *err, size_t errlen)
{
	for (size_t i = 0; i < n; i++)
		if (t[i].name && t[i].def && set(&t[i], obj, t[i].def, "default", err, errlen))
			return -1;
	return 0;
}

/* The row for --name[0..len) or -c (len 0) in the first table that has it. */
static const struct opt *lookup(const struct opts_cli *c, const char *name, size_t len,
				char sc, void **obj)
{
	for (size_t k = 0; k < c->ntabs; k++) {
		const struct opts_tab *tb = &c->tabs[k];
		for (size_t i = 0; i < tb->n; i++) {
			const struct opt *o = &tb->t[i];
			if (o->name && (len ? strlen(o->name) == len && !strncmp(o->name, name, len)
					    : sc && o->shortname == sc)) {
				*obj = tb->obj;
				return o;
			}
		}
	}
	return NULL;
}

static bool any_short(const struct opts_cli *c)
{
	for (size_t k = 0; k < c->ntabs; k++)
		for (size_t i = 0; i < c->tabs[k].n; i++)
			if (c->tabs[k].t[i].shortname)
				return true;
	return false;
}

/* -abc: flags a and b, then c with the rest of the argument or the next one */
static int short_opts(const struct opts_cli *c, int argc, char **argv, int *i,
		      char *err, size_t errlen)
{
	for (const char *s = argv[*i] + 1; *s; s++) {
		void *obj;
		const struct opt *o = lookup(c, NULL, 0, *s, &obj);
		const char *val = NULL;

		if (!o && *s == 'h')
			return OPTS_HELP;
		if (!o)
			return fail(err, errlen, "unknown flag -%c (see --help)", *s);
		if (o->type != OPT_FLAG) {
			if (s[1])
				val = s + 1;
			else if (*i + 1 >= argc)
				return fail(err, errlen, "flag -%c needs a value", *s);
			else
				val = argv[++*i];
		}
		if (set(o, obj, val, c->origin, err, errlen))
			return -1;
		if (val)
			break;
	}
	return 0;
}

int opts_argv(const struct opts_cli *c, int argc, char **argv, int *i,
	      char *err, size_t errlen)
{
	bool shorts = any_short(c);

	for (; *i < argc; ++*i) {
		const char *a = argv[*i], *val = NULL;

		if (a[0] == '-' && a[1] == '-' && a[2]) {
			const char *name = a + 2, *eq = strchr(name, '=');
			size_t len = eq ? (size_t)(eq - name) : strlen(name);
			void *obj;
			const struct opt *o = lookup(c, name, len, 0, &obj);

			if (!o && !eq && !strcmp(name, "help"))
				return OPTS_HELP;
			if (!o)
				return fail(err, errlen, "unknown flag --%.*s (see --help)", (int)len, name);
			if (o->type == OPT_FLAG && eq)
				return fail(err, errlen, "flag --%s takes no value", o->name);
			if (o->type != OPT_FLAG && eq)
				val = eq + 1;
			else if (o->type != OPT_FLAG && *i + 1 >= argc)
				return fail(err, errlen, "flag --%s needs a value", o->name);
			else if (o->type != OPT_FLAG)
				val = argv[++*i];
			if (set(o, obj, val, c->origin, err, errlen))
				return -1;
		} else if (a[0] == '-' && a[1] && a[1] != '-' && shorts) {
			int r = short_opts(c, argc, argv, i, err, errlen);
			if (r)
				return r;
		} else if (!c->positional) {
			return fail(err, errlen, "unexpected argument \"%s\" (see --help)", a);
		} else {
			int r = c->positional(c->ctx, a, err, errlen);
			if (r)
				return r;
		}
	}
	return 0;
}

int opts_env(const struct opt *t, size_t n, void *obj, const char *prefix,
	     char *err, size_t errlen)
{
	for (size_t i = 0; i < n; i++) {
		char name[128];
		size_t k = (size_t)snprintf(name, sizeof(name), "%s", prefix);

		if (!t[i].name)
			continue;
		for (const char *s = t[i].name; *s && k + 1 < sizeof(name); s++)
			name[k++] = *s == '-' ? '_' : (char)toupper((unsigned char)*s);
		name[k] = '\0';
		const char *v = getenv(name);
		if (v && set(&t[i], obj, *v || t[i].type != OPT_STR ? v : NULL, name,
				  err, errlen))
			return -1;
	}
	return 0;
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

int opts_load_file(const struct opt *t, size_t n, void *obj, const char *path,
		   char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char line[4096], origin[300];
	int lineno = 0, rc = 0;

	if (!f)
		return fail(err, errlen, "config file %s: %s", path, strerror(errno));
	while (!rc && fgets(line, sizeof(line), f)) {
		lineno++;
		snprintf(origin, sizeof(origin), "%s:%d", path, lineno);
		if (!strchr(line, '\n') && !feof(f)) {
			rc = fail(err, errlen, "%s: line too long", origin);
			break;
		}
		char *s = trim(line);
		if (!*s || *s == '#')
			continue;
		size_t klen = strcspn(s, " \t=");
		char *v = s + klen;
		while (*v == ' ' || *v == '\t' || *v == '=')
			v++;
		/* Optional quotes around the value. */
		size_t vlen = strlen(v);
		if (vlen >= 2 && v[0] == '"' && v[vlen - 1] == '"') {
			v[vlen - 1] = '\0';
			v++;
		}
		const struct opt *o = find(t, n, s, klen);
		if (!o)
			rc = fail(err, errlen, "%s: unknown key \"%.*s\"", origin, (int)klen, s);
		else if (!*v)
			rc = fail(err, errlen, "%s: %s needs a value", origin, o->name);
		else
			rc = set(o, obj, v, origin, err, errlen);
	}
	fclose(f);
	return rc;
}

void opts_usage(const struct opt *t, size_t n, FILE *out)
{
	for (size_t i = 0; i < n; i++) {
		const struct opt *o = &t[i];
		char left[128];

		if (!o->name) {
			fprintf(out, "\n%s\n", o->help);
			continue;
		}
		int k = o->shortname ? snprintf(left, sizeof(left), "-%c, ", o->shortname) : 0;
		snprintf(left + k, sizeof(left) - (size_t)k, "--%s%s%s", o->name,
			 o->meta ? " " : "", o->meta ? o->meta : "");
		fprintf(out, "  %-26s ", left);
		for (const char *h = o->help; *h; h++)
			if (*h == '\n')
				fputs("\n                             ", out);
			else
				fputc(*h, out);
		fprintf(out, "%s%s%s\n", o->def ? " [" : "", o->def ? o->def : "", o->def ? "]" : "");
	}
}

void opts_dump(const struct opt *t, size_t n, const void *obj, FILE *out)
{
	for (size_t i = 0; i < n; i++) {
		const char *p = (const char *)obj + t[i].off;

		if (!t[i].name || t[i].off == OPT_NO_FIELD)
			continue;
		switch (t[i].type) {
		case OPT_STR: {
			const char *s = *(char *const *)(const void *)p;
			if (s)
				fprintf(out, "%s %s\n", t[i].name, s);
			else
				fprintf(out, "# %s (unset)\n", t[i].name);
			break;
		}
		case OPT_INT:
			fprintf(out, "%s %d\n", t[i].name, *(const int *)(const void *)p);
			break;
		case OPT_LONG:
			fprintf(out, "%s %ld\n", t[i].name, *(const long *)(const void *)p);
			break;
		case OPT_UINT:
			fprintf(out, "%s %u\n", t[i].name, *(const unsigned *)(const void *)p);
			break;
		case OPT_U64:
			fprintf(out, "%s %" PRIu64 "\n", t[i].name, *(const uint64_t *)(const void *)p);
			break;
		case OPT_DBL:
			fprintf(out, "%s %g\n", t[i].name, *(const double *)(const void *)p);
			break;
		case OPT_FLAG:
			break;
		}
	}
}

void opts_free(const struct opt *t, size_t n, void *obj)
{
	for (size_t i = 0; i < n; i++)
		if (t[i].name && t[i].type == OPT_STR && t[i].off != OPT_NO_FIELD) {
			char **s = (char **)(void *)((char *)obj + t[i].off);
			free(*s);
			*s = NULL;
		}
}

void opts_die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (see --help)\n", stderr);
	exit(2);
}

int opts_argv_or_exit(const struct opts_cli *c, int argc, char **argv, int *i,
		      void (*usage)(FILE *out))
{
	char err[512];
	int r = opts_argv(c, argc, argv, i, err, sizeof(err));

	if (r == OPTS_HELP) {
		usage(stdout);
		exit(0);
	}
	if (r < 0) {
		fprintf(stderr, "%s: %s\n", program_invocation_short_name, err);
		exit(2);
	}
	return r;
}
