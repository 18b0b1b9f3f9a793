/*
 * schema.c - device types and the JSON Schema subset of docs/device-types.md.
 *
 * Every schema is compiled once, at load, into a tree of schema_node: the
 * keywords become flags, bounds, a regex_t, a sorted property table and a list
 * of required indices, so validation never looks at the schema's JSON again and
 * never allocates (the one exception is glibc's regexec(), which may allocate
 * internally while it matches a `pattern`).
 *
 * Semantics follow JSON Schema where the subset is silent: a keyword applies
 * only to values of its own kind ("minimum" to numbers, "maxLength" to strings,
 * ...), a schema without "type" accepts any kind, "integer" means a JSON
 * integer (1.0 is not one), "number" accepts integers and reals, and enum
 * members are compared with json_equal(). Unknown keywords are ignored.
 */
#include "protocols/schema.h"

#include "hub/anomaly.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <regex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SCHEMA_MAX_DEPTH 32          /* schema nesting, root = 1 */
#define SCHEMA_MAX_ERRORS 64         /* a validation walk stops here */
#define SCHEMA_MAX_FILE (1024 * 1024)
#define SCHEMA_NAME_MAX 128          /* device_type and command names */
#define SCHEMA_LOAD_PATH 256
#define SCHEMA_PATTERN_COST 1000     /* regcomp parse-tree nodes, see below */
#define SCHEMA_PATTERN_GROUPS 32     /* nested ( ) in a pattern */

enum kind {
	K_ANY = 0,
	K_OBJECT,
	K_NUMBER,
	K_INTEGER,
	K_STRING,
	K_BOOLEAN,
	K_ARRAY,
};

static const struct {
	const char *name;
	const char *message;
} kinds[] = {
	[K_ANY] = { "", "" },
	[K_OBJECT] = { "object", "must be an object" },
	[K_NUMBER] = { "number", "must be a number" },
	[K_INTEGER] = { "integer", "must be an integer" },
	[K_STRING] = { "string", "must be a string" },
	[K_BOOLEAN] = { "boolean", "must be a boolean" },
	[K_ARRAY] = { "array", "must be an array" },
};

enum {
	F_MIN = 1u << 0,
	F_MAX = 1u << 1,
	F_MIN_LEN = 1u << 2,
	F_MAX_LEN = 1u << 3,
	F_MAX_ITEMS = 1u << 4,
	F_PATTERN = 1u << 5,        /* re is compiled and must be regfree()d */
	F_NO_ADDITIONAL = 1u << 6,  /* additionalProperties: false */
};

/* A numeric bound kept both ways so integers compare exactly. */
struct bound {
	int is_int;
	json_int_t i;
	double d;
	char text[32];              /* as printed in messages */
};

struct schema_prop {
	char *name;                 /* owned; may hold NUL bytes, see len */
	size_t len;
	schema_node *node;          /* NULL: named only by `required` */
	int required;
};

struct schema_node {
	enum kind kind;
	unsigned flags;
	struct bound min, max;
	size_t min_len, max_len, max_items;
	regex_t re;
	char *pattern_msg;          /* "must match pattern ..." (fits 128) */
	json_t *enum_vals;          /* private deep copy, or NULL */
	struct schema_prop *props;  /* sorted by (bytes, length) */
	size_t nprops;
	size_t *req;                /* indices into props, `required` order */
	size_t nreq;
	schema_node *items;
};

struct schema_cmd {
	char *name;
	schema_node *node;
};

struct schema_type {
	char *name;
	size_t name_len;
	char *source;               /* file name (or "docs[i]") it came from */
	json_t *doc;                /* one reference */
	schema_node *telemetry;
	anom_spec *anom;            /* x-anomaly rules; NULL: no field marked */
	struct schema_cmd *cmds;    /* sorted by name */
	size_t ncmds;
};

struct schema_set {
	schema_type *types;         /* in load order (sorted file names) */
	size_t count;
	schema_type **by_name;      /* sorted by name */
};

/* ------------------------------------------------------------------ memory */

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		fputs("schema: out of memory\n", stderr);
		abort();
	}
	return p;
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p) {
		fputs("schema: out of memory\n", stderr);
		abort();
	}
	return p;
}

static char *xstrndup(const char *s, size_t n)
{
	char *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* -------------------------------------------------------------------- paths */

/* Length of the longest prefix of s[0..n) that does not end inside a UTF-8
 * sequence, so a cut string stays valid UTF-8 (json_string() refuses it
 * otherwise). */
static size_t utf8_cut(const char *s, size_t n)
{
	size_t i = n;

	/* s[n] would be the first byte dropped: back up over continuation
	 * bytes so the sequence it belongs to is dropped whole. */
	while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80)
		i--;
	return i;
}

/* Drops a UTF-8 sequence left incomplete at the end of s by a truncating
 * snprintf(), so load errors stay valid UTF-8 too. */
static void utf8_trim_tail(char *s)
{
	size_t len = strlen(s), j = len, need;
	unsigned char lead;

	while (j > 0 && len - j < 3 && ((unsigned char)s[j - 1] & 0xC0) == 0x80)
		j--;
	if (j == 0)
		return;
	lead = (unsigned char)s[j - 1];
	if (lead < 0xC0)
		return;
	need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
	if (len - (j - 1) < need)
		s[j - 1] = '\0';
}

/* Where a path ends: len bytes are in the buffer, vlen is what the full path
 * would be. vlen > len means the path was cut and nothing more is appended. */
struct ppos {
	size_t len;
	size_t vlen;
};

static struct ppos path_push(char *buf, size_t cap, struct ppos at,
			     const char *s, size_t n)
{
	struct ppos r = { at.len, at.vlen + n };
	size_t fit;

	if (at.vlen != at.len)
		return r;
	fit = cap - 1 - at.len;
	if (n <= fit) {
		fit = n;
	} else {
		fit = utf8_cut(s, fit);
	}
	memcpy(buf + at.len, s, fit);
	r.len = at.len + fit;
	buf[r.len] = '\0';
	return r;
}

static struct ppos path_key(char *buf, size_t cap, struct ppos at,
			    const char *key, size_t n)
{
	if (at.vlen > 0)
		at = path_push(buf, cap, at, ".", 1);
	return path_push(buf, cap, at, key, n);
}

static struct ppos path_str(char *buf, size_t cap, struct ppos at, const char *s)
{
	return path_push(buf, cap, at, s, strlen(s));
}

static void path_cut(char *buf, struct ppos at)
{
	buf[at.len] = '\0';
}

/* Copies the path into dst (dcap >= 4), ending a cut path with "...". */
static void path_copy(char *dst, size_t dcap, const char *buf, struct ppos at)
{
	size_t n = at.len;

	if (n < at.vlen || n > dcap - 1) {
		if (n > dcap - 4)
			n = utf8_cut(buf, dcap - 4);
		memcpy(dst, buf, n);
		memcpy(dst + n, "...", 4);
		return;
	}
	memcpy(dst, buf, n);
	dst[n] = '\0';
}

/* --------------------------------------------------------------- numbers */

/* Shortest %g form that reads back as the same double: 125, 0.5, 0.1. */
static void format_real(double d, char *buf, size_t cap)
{
	for (int prec = 1; prec <= 17; prec++) {
		snprintf(buf, cap, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

static void bound_set(struct bound *b, const json_t *v)
{
	if (json_is_integer(v)) {
		b->is_int = 1;
		b->i = json_integer_value(v);
		b->d = (double)b->i;
		snprintf(b->text, sizeof(b->text), "%" JSON_INTEGER_FORMAT, b->i);
	} else {
		b->is_int = 0;
		b->d = json_real_value(v);
		format_real(b->d, b->text, sizeof(b->text));
	}
}

/* Exact comparison of an integer with a finite double: <0, 0, >0. */
static int cmp_int_real(json_int_t i, double d)
{
	json_int_t t;
	double frac;

	if (d >= 9223372036854775808.0)
		return -1;
	if (d < -9223372036854775808.0)
		return 1;
	t = (json_int_t)d;   /* truncates toward zero; in range here */
	if (i != t)
		return i < t ? -1 : 1;
	frac = d - (double)t;
	return frac > 0 ? -1 : frac < 0 ? 1 : 0;
}

/* Compares a JSON number with a bound: <0, 0, >0. */
static int cmp_bound(const json_t *v, const struct bound *b)
{
	if (json_is_integer(v)) {
		json_int_t i = json_integer_value(v);

		if (b->is_int)
			return i < b->i ? -1 : i > b->i ? 1 : 0;
		return cmp_int_real(i, b->d);
	}
	double d = json_real_value(v);

	if (b->is_int)
		return -cmp_int_real(b->i, d);
	return d < b->d ? -1 : d > b->d ? 1 : 0;
}

/* ---------------------------------------------------------- node lifetime */

static void node_free(schema_node *n)
{
	if (!n)
		return;
	if (n->flags & F_PATTERN)
		regfree(&n->re);
	free(n->pattern_msg);
	json_decref(n->enum_vals);
	for (size_t i = 0; i < n->nprops; i++) {
		free(n->props[i].name);
		node_free(n->props[i].node);
	}
	free(n->props);
	free(n->req);
	node_free(n->items);
	free(n);
}

static int prop_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
	int c = memcmp(a, b, alen < blen ? alen : blen);

	if (c)
		return c;
	return alen < blen ? -1 : alen > blen ? 1 : 0;
}

static int prop_qsort_cmp(const void *a, const void *b)
{
	const struct schema_prop *pa = a, *pb = b;

	return prop_cmp(pa->name, pa->len, pb->name, pb->len);
}

static struct schema_prop *prop_find(const struct schema_prop *props, size_t n,
				     const char *key, size_t len)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = prop_cmp(key, len, props[mid].name, props[mid].len);

		if (c == 0)
			return (struct schema_prop *)&props[mid];
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* ---------------------------------------------------------------- loading */

struct loader {
	const char *file;       /* "thermostat.json" or "docs[1]" */
	char *err;
	size_t errlen;
	char path[SCHEMA_LOAD_PATH];
};

__attribute__((format(printf, 3, 4)))
static void load_fail(struct loader *ld, struct ppos at, const char *fmt, ...)
{
	char msg[256];
	char path[SCHEMA_LOAD_PATH];
	va_list ap;

	if (!ld->err || ld->errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	utf8_trim_tail(msg);
	path_copy(path, sizeof(path), ld->path, at);
	if (at.vlen)
		snprintf(ld->err, ld->errlen, "%s: %s: %s", ld->file, path, msg);
	else
		snprintf(ld->err, ld->errlen, "%s: %s", ld->file, msg);
	utf8_trim_tail(ld->err);
}

static schema_node *compile_node(struct loader *ld, const json_t *j,
				 struct ppos at, int depth);

static int compile_type_kw(struct loader *ld, schema_node *n, const json_t *v,
			   struct ppos at)
{
	const char *s = json_string_value(v);

	if (s) {
		for (size_t k = K_OBJECT; k <= K_ARRAY; k++) {
			if (strcmp(s, kinds[k].name) == 0 &&
			    strlen(s) == json_string_length(v)) {
				n->kind = (enum kind)k;
				return 0;
			}
		}
	}
	load_fail(ld, at, "must be one of \"object\", \"number\", \"integer\", "
		  "\"string\", \"boolean\", \"array\"");
	return -1;
}

static int compile_count(struct loader *ld, const json_t *v, struct ppos at,
			 size_t *out)
{
	if (!json_is_integer(v) || json_integer_value(v) < 0) {
		load_fail(ld, at, "must be a non-negative integer");
		return -1;
	}
	*out = (size_t)json_integer_value(v);
	return 0;
}

static int compile_properties(struct loader *ld, schema_node *n,
			      const json_t *props, const json_t *req,
			      struct ppos at, int depth)
{
	size_t np = json_object_size(props), nr = json_array_size(req);
	size_t cap = np + nr, count = 0;
	char *buf = ld->path;
	struct ppos pat, sub;
	const char *key;
	size_t klen;
	json_t *val;

	n->props = xcalloc(cap, sizeof(*n->props));
	if (props) {
		pat = path_key(buf, sizeof(ld->path), at, "properties", 10);
		if (!json_is_object(props)) {
			load_fail(ld, pat, "must be an object");
			return -1;
		}
		json_object_keylen_foreach((json_t *)props, key, klen, val) {
			struct schema_prop *p = &n->props[count];

			sub = path_key(buf, sizeof(ld->path), pat, key, klen);
			p->name = xstrndup(key, klen);
			p->len = klen;
			n->nprops = ++count;
			p->node = compile_node(ld, val, sub, depth + 1);
			if (!p->node)
				return -1;
			path_cut(buf, pat);
		}
		path_cut(buf, at);
		qsort(n->props, count, sizeof(*n->props), prop_qsort_cmp);
	}
	if (!req)
		return 0;

	pat = path_key(buf, sizeof(ld->path), at, "required", 8);
	if (!json_is_array(req)) {
		load_fail(ld, pat, "must be an array of strings");
		return -1;
	}
	/* Add an entry per required name, sort, then merge equal names: a
	 * name not in `properties` keeps an entry without a schema. */
	for (size_t i = 0; i < nr; i++) {
		const json_t *r = json_array_get(req, i);
		struct schema_prop *p = &n->props[count];

		if (!json_is_string(r)) {
			load_fail(ld, pat, "must be an array of strings");
			return -1;
		}
		p->len = json_string_length(r);
		p->name = xstrndup(json_string_value(r), p->len);
		p->required = 1;
		n->nprops = ++count;
	}
	qsort(n->props, count, sizeof(*n->props), prop_qsort_cmp);
	count = 0;
	for (size_t i = 0; i < n->nprops; i++) {
		struct schema_prop *p = &n->props[i], *q;

		if (count == 0 || prop_cmp(p->name, p->len, n->props[count - 1].name,
					   n->props[count - 1].len) != 0) {
			n->props[count++] = *p;
			continue;
		}
		q = &n->props[count - 1];
		if (p->required && q->required) {
			/* Entries i.. stay owned by the table until the merge
			 * ends: keep them there for node_free(). */
			load_fail(ld, pat, "duplicate name \"%s\"", p->name);
			memmove(&n->props[count], &n->props[i],
				(n->nprops - i) * sizeof(*n->props));
			n->nprops = count + (n->nprops - i);
			return -1;
		}
		/* One is the `properties` entry, the other a required name. */
		q->required = 1;
		if (!q->node)
			q->node = p->node;
		free(p->name);
	}
	n->nprops = count;
	n->req = xcalloc(nr, sizeof(*n->req));
	for (size_t i = 0; i < nr; i++) {
		const json_t *r = json_array_get(req, i);
		struct schema_prop *p = prop_find(n->props, count,
						  json_string_value(r),
						  json_string_length(r));

		n->req[i] = (size_t)(p - n->props);
	}
	n->nreq = nr;
	return 0;
}

/* Parses the digits at s[*i], saturating; returns how many there were. */
static size_t pattern_digits(const char *s, size_t *i, size_t *val)
{
	size_t start = *i;

	*val = 0;
	while (s[*i] >= '0' && s[*i] <= '9') {
		if (*val < 1000000)
			*val = *val * 10 + (size_t)(s[*i] - '0');
		(*i)++;
	}
	return *i - start;
}

/* Index of the ']' closing the bracket expression opened at s[i] (or of the
 * terminating NUL when there is none: regcomp() then refuses it). */
static size_t pattern_bracket_end(const char *s, size_t i)
{
	i++;
	if (s[i] == '^')
		i++;
	if (s[i] == ']')
		i++;
	for (; s[i] && s[i] != ']'; i++) {
		if (s[i] == '[' && (s[i + 1] == ':' || s[i + 1] == '.' ||
				    s[i + 1] == '=')) {
			char close = s[i + 1];

			for (i += 2; s[i] && !(s[i] == close && s[i + 1] == ']'); i++)
				;
			if (!s[i])
				return i;
			i++;
		}
	}
	return i;
}

/* glibc's regcomp() copies the atom before `+` (twice) and `{m,n}` (up to n
 * times), so nested repetitions multiply: "a++++..." or "((a{99}){99}){99}"
 * would take gigabytes (found by fuzz_schema). This bounds the size of the
 * parse tree regcomp builds; it also rejects back-references, whose matching
 * is exponential. Returns 0 when s is acceptable, else -1 with why not in
 * err. Other syntax errors are left to regcomp(). */
static int pattern_check(const char *s, char *err, size_t errlen)
{
	size_t total[SCHEMA_PATTERN_GROUPS + 1], last[SCHEMA_PATTERN_GROUPS + 1];
	int depth = 0;

	total[0] = last[0] = 0;
	for (size_t i = 0; s[i]; i++) {
		size_t factor = 0, atom = 1;

		switch (s[i]) {
		case '(':
			if (depth == SCHEMA_PATTERN_GROUPS) {
				snprintf(err, errlen, "groups nested too deep");
				return -1;
			}
			depth++;
			total[depth] = last[depth] = 0;
			continue;
		case ')':
			if (depth == 0)
				break;
			atom = total[depth] + last[depth] + 1;
			depth--;
			break;
		case '|':
			total[depth] += last[depth] + 1;
			last[depth] = 0;
			atom = 0;
			break;
		case '*':
		case '?':
			factor = 1;
			break;
		case '+':
			factor = 2;
			break;
		case '{': {
			size_t j = i + 1, m = 0, n = 0, nm, nn = 0;
			int comma = 0;

			nm = pattern_digits(s, &j, &m);
			if (s[j] == ',') {
				comma = 1;
				j++;
				nn = pattern_digits(s, &j, &n);
			}
			if (s[j] != '}' || (nm == 0 && nn == 0))
				break;   /* not an interval: a literal '{' */
			factor = nn ? n : comma ? m + 1 : m;
			if (factor == 0)
				factor = 1;
			i = j;
			break;
		}
		case '\\':
			if (s[i + 1] >= '1' && s[i + 1] <= '9') {
				snprintf(err, errlen, "back-references are not supported");
				return -1;
			}
			if (s[i + 1])
				i++;
			break;
		case '[':
			i = pattern_bracket_end(s, i);
			if (!s[i])
				return 0;
			break;
		default:
			break;
		}
		if (factor) {
			last[depth] = last[depth] * factor + 1;
		} else if (atom) {
			total[depth] += last[depth];
			last[depth] = atom;
		}
		if (total[depth] + last[depth] > SCHEMA_PATTERN_COST) {
			snprintf(err, errlen, "too complex (its repetitions expand too far)");
			return -1;
		}
	}
	return 0;
}

static int compile_pattern(struct loader *ld, schema_node *n, const json_t *v,
			   struct ppos at)
{
	const char *s = json_string_value(v);
	char msg[sizeof(((schema_error *)0)->message)];
	char full[512], why[64];
	size_t len;
	int rc;

	if (!s || strlen(s) != json_string_length(v)) {
		load_fail(ld, at, "must be a string");
		return -1;
	}
	if (pattern_check(s, why, sizeof(why))) {
		load_fail(ld, at, "%s", why);
		return -1;
	}
	rc = regcomp(&n->re, s, REG_EXTENDED | REG_NOSUB);
	if (rc != 0) {
		char reason[128];

		regerror(rc, &n->re, reason, sizeof(reason));
		load_fail(ld, at, "invalid regular expression: %s", reason);
		return -1;
	}
	n->flags |= F_PATTERN;
	len = (size_t)snprintf(full, sizeof(full), "must match pattern %s", s);
	if (len >= sizeof(full))
		len = sizeof(full) - 1;
	if (len > sizeof(msg) - 1)
		len = utf8_cut(full, sizeof(msg) - 1);
	n->pattern_msg = xstrndup(full, len);
	return 0;
}

/* Compiles one schema object at path `at` (ld->path holds it). */
static schema_node *compile_node(struct loader *ld, const json_t *j,
				 struct ppos at, int depth)
{
	char *buf = ld->path;
	const size_t cap = sizeof(ld->path);
	schema_node *n;
	const json_t *v;
	struct ppos kw;

	if (!json_is_object(j)) {
		load_fail(ld, at, "must be an object");
		return NULL;
	}
	if (depth > SCHEMA_MAX_DEPTH) {
		load_fail(ld, at, "nesting deeper than %d", SCHEMA_MAX_DEPTH);
		return NULL;
	}
	n = xcalloc(1, sizeof(*n));

	/* Sets v and puts "<at>.<name>" in the path buffer for messages; the
	 * next keyword overwrites it from at.len on. */
#define KW(name) (v = json_object_get(j, name), \
		  kw = path_key(buf, cap, at, name, strlen(name)), v)

	if (KW("type") && compile_type_kw(ld, n, v, kw))
		goto fail;
	if ((json_object_get(j, "properties") || json_object_get(j, "required")) &&
	    compile_properties(ld, n, json_object_get(j, "properties"),
			       json_object_get(j, "required"), at, depth))
		goto fail;
	if (KW("additionalProperties")) {
		if (!json_is_boolean(v)) {
			load_fail(ld, kw, "must be a boolean");
			goto fail;
		}
		if (json_is_false(v))
			n->flags |= F_NO_ADDITIONAL;
	}
	if (KW("minimum")) {
		if (!json_is_number(v)) {
			load_fail(ld, kw, "must be a number");
			goto fail;
		}
		bound_set(&n->min, v);
		n->flags |= F_MIN;
	}
	if (KW("maximum")) {
		if (!json_is_number(v)) {
			load_fail(ld, kw, "must be a number");
			goto fail;
		}
		bound_set(&n->max, v);
		n->flags |= F_MAX;
	}
	if ((n->flags & F_MIN) && (n->flags & F_MAX) &&
	    cmp_bound(json_object_get(j, "minimum"), &n->max) > 0) {
		load_fail(ld, at, "minimum is greater than maximum");
		goto fail;
	}
	if (KW("enum")) {
		if (!json_is_array(v) || json_array_size(v) == 0) {
			load_fail(ld, kw, "must be a non-empty array");
			goto fail;
		}
		n->enum_vals = json_deep_copy(v);
		if (!n->enum_vals) {
			fputs("schema: out of memory\n", stderr);
			abort();
		}
	}
	if (KW("minLength")) {
		if (compile_count(ld, v, kw, &n->min_len))
			goto fail;
		n->flags |= F_MIN_LEN;
	}
	if (KW("maxLength")) {
		if (compile_count(ld, v, kw, &n->max_len))
			goto fail;
		n->flags |= F_MAX_LEN;
	}
	if (KW("pattern") && compile_pattern(ld, n, v, kw))
		goto fail;
	if (KW("items")) {
		n->items = compile_node(ld, v, kw, depth + 1);
		if (!n->items)
			goto fail;
		path_cut(buf, at);
	}
	if (KW("maxItems")) {
		if (compile_count(ld, v, kw, &n->max_items))
			goto fail;
		n->flags |= F_MAX_ITEMS;
	}
#undef KW
	path_cut(buf, at);
	return n;
fail:
	node_free(n);
	return NULL;
}

static int valid_name(const char *s, size_t len)
{
	if (len < 1 || len > SCHEMA_NAME_MAX)
		return 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '_' ||
		      c == ':' || c == '-'))
			return 0;
	}
	return 1;
}

static void type_clear(schema_type *t)
{
	free(t->name);
	free(t->source);
	json_decref(t->doc);
	node_free(t->telemetry);
	anom_spec_free(t->anom);
	for (size_t i = 0; i < t->ncmds; i++) {
		free(t->cmds[i].name);
		node_free(t->cmds[i].node);
	}
	free(t->cmds);
	memset(t, 0, sizeof(*t));
}

static int cmd_qsort_cmp(const void *a, const void *b)
{
	const struct schema_cmd *ca = a, *cb = b;

	return strcmp(ca->name, cb->name);
}

/* Compiles one device-type document into t (zeroed). On error t may hold a
 * partial type: the caller clears it. */
static int compile_type(struct loader *ld, json_t *doc, schema_type *t)
{
	char *buf = ld->path;
	const size_t cap = sizeof(ld->path);
	struct ppos root = { 0, 0 }, at, sub;
	char msg[192];
	const json_t *v, *cmds;
	const char *key;
	size_t klen;
	json_t *val;

	buf[0] = '\0';
	if (!json_is_object(doc)) {
		load_fail(ld, root, "must be an object");
		return -1;
	}
	t->source = xstrndup(ld->file, strlen(ld->file));
	t->doc = json_incref(doc);
	at = path_str(buf, cap, root, "device_type");
	v = json_object_get(doc, "device_type");
	if (!json_is_string(v) ||
	    !valid_name(json_string_value(v), json_string_length(v))) {
		load_fail(ld, at, v ? "must be a string matching [A-Za-z0-9._:-]{1,128}"
				    : "is required");
		return -1;
	}
	t->name = xstrndup(json_string_value(v), json_string_length(v));
	t->name_len = json_string_length(v);
	path_cut(buf, root);

	at = path_str(buf, cap, root, "telemetry");
	v = json_object_get(doc, "telemetry");
	if (!v) {
		load_fail(ld, at, "is required");
		return -1;
	}
	t->telemetry = compile_node(ld, v, at, 1);
	if (!t->telemetry)
		return -1;
	if (anom_spec_parse(v, &t->anom, msg, sizeof(msg))) {
		snprintf(ld->err, ld->errlen, "%s: %s", ld->file, msg);
		return -1;
	}
	path_cut(buf, root);

	at = path_str(buf, cap, root, "commands");
	cmds = json_object_get(doc, "commands");
	if (!cmds)
		return 0;
	if (!json_is_object(cmds)) {
		load_fail(ld, at, "must be an object");
		return -1;
	}
	t->cmds = xcalloc(json_object_size(cmds), sizeof(*t->cmds));
	json_object_keylen_foreach((json_t *)cmds, key, klen, val) {
		struct schema_cmd *c = &t->cmds[t->ncmds];

		sub = path_key(buf, cap, at, key, klen);
		if (klen == 0 || klen > SCHEMA_NAME_MAX || strlen(key) != klen) {
			load_fail(ld, sub, "command name must be 1 to %d bytes "
				  "without NUL", SCHEMA_NAME_MAX);
			return -1;
		}
		c->name = xstrndup(key, klen);
		t->ncmds++;
		c->node = compile_node(ld, val, sub, 1);
		if (!c->node)
			return -1;
		path_cut(buf, at);
	}
	qsort(t->cmds, t->ncmds, sizeof(*t->cmds), cmd_qsort_cmp);
	return 0;
}

static int type_name_cmp(const schema_type *a, const char *name, size_t len)
{
	return prop_cmp(a->name, a->name_len, name, len);
}

static int by_name_qsort_cmp(const void *a, const void *b)
{
	const schema_type *ta = *(const schema_type *const *)a;
	const schema_type *tb = *(const schema_type *const *)b;
	int c = type_name_cmp(ta, tb->name, tb->name_len);

	if (c)
		return c;
	/* Stable on load order so a duplicate names the earlier file. */
	return ta < tb ? -1 : ta > tb ? 1 : 0;
}

__attribute__((format(printf, 3, 4)))
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	utf8_trim_tail(err);
}

/* Builds a set from n documents named names[i] (borrowed). */
static schema_set *build_set(json_t *const *docs, char *const *names, size_t n,
			     char *err, size_t errlen)
{
	schema_set *set = xcalloc(1, sizeof(*set));
	struct loader ld = { .err = err, .errlen = errlen };

	set->types = xcalloc(n, sizeof(*set->types));
	set->by_name = xcalloc(n, sizeof(*set->by_name));
	for (size_t i = 0; i < n; i++) {
		ld.file = names[i];
		set->count = i + 1;
		if (compile_type(&ld, docs[i], &set->types[i]))
			goto fail;
		set->by_name[i] = &set->types[i];
	}
	qsort(set->by_name, n, sizeof(*set->by_name), by_name_qsort_cmp);
	for (size_t i = 1; i < n; i++) {
		const schema_type *a = set->by_name[i - 1], *b = set->by_name[i];

		if (type_name_cmp(a, b->name, b->name_len) == 0) {
			set_err(err, errlen, "%s: device_type \"%s\" is already "
				"declared by %s", b->source, b->name, a->source);
			goto fail;
		}
	}
	return set;
fail:
	schema_set_free(set);
	return NULL;
}

schema_set *schema_set_from_json(const json_t *docs, char *err, size_t errlen)
{
	size_t n = json_array_size(docs);
	json_t **list;
	char **names;
	schema_set *set;

	if (!json_is_array(docs)) {
		set_err(err, errlen, "docs: must be an array");
		return NULL;
	}
	list = xcalloc(n, sizeof(*list));
	names = xcalloc(n, sizeof(*names));
	for (size_t i = 0; i < n; i++) {
		char name[32];

		snprintf(name, sizeof(name), "docs[%zu]", i);
		names[i] = xstrndup(name, strlen(name));
		list[i] = json_array_get(docs, i);
	}
	set = build_set(list, names, n, err, errlen);
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	free(list);
	return set;
}

static int name_qsort_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_json_name(const char *name)
{
	size_t len = strlen(name);

	return name[0] != '.' && len > 5 && strcmp(name + len - 5, ".json") == 0;
}

/* Reads and parses dir/name (at most SCHEMA_MAX_FILE bytes). */
static json_t *load_file(int dfd, const char *name, char *err, size_t errlen)
{
	json_t *doc = NULL;
	json_error_t jerr;
	struct stat st;
	char *buf = NULL;
	size_t len = 0;
	int fd;

	fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		set_err(err, errlen, "%s: %s", name, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) != 0) {
		set_err(err, errlen, "%s: %s", name, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		set_err(err, errlen, "%s: not a regular file", name);
		goto out;
	}
	if (st.st_size > SCHEMA_MAX_FILE) {
		set_err(err, errlen, "%s: larger than %d bytes", name,
			SCHEMA_MAX_FILE);
		goto out;
	}
	/* Read to EOF, one byte past the cap, in case the file grew. */
	buf = xmalloc(SCHEMA_MAX_FILE + 1);
	for (;;) {
		ssize_t r = read(fd, buf + len, SCHEMA_MAX_FILE + 1 - len);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			set_err(err, errlen, "%s: %s", name, strerror(errno));
			goto out;
		}
		if (r == 0)
			break;
		len += (size_t)r;
		if (len > SCHEMA_MAX_FILE) {
			set_err(err, errlen, "%s: larger than %d bytes", name,
				SCHEMA_MAX_FILE);
			goto out;
		}
	}
	doc = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!doc)
		set_err(err, errlen, "%s: line %d column %d: %s", name,
			jerr.line, jerr.column, jerr.text);
out:
	free(buf);
	close(fd);
	return doc;
}

schema_set *schema_set_load_dir(const char *dir, char *err, size_t errlen)
{
	schema_set *set = NULL;
	char **names = NULL;
	json_t **docs = NULL;
	size_t n = 0, cap = 0, loaded = 0;
	struct dirent *de;
	DIR *d;

	if (!dir) {
		set_err(err, errlen, "no schema directory");
		return NULL;
	}
	d = opendir(dir);
	if (!d) {
		set_err(err, errlen, "%s: %s", dir, strerror(errno));
		return NULL;
	}
	for (;;) {
		errno = 0;
		de = readdir(d);
		if (!de) {
			if (errno) {
				set_err(err, errlen, "%s: %s", dir, strerror(errno));
				goto out;
			}
			break;
		}
		if (!is_json_name(de->d_name))
			continue;
		if (n == cap) {
			char **grown;

			cap = cap ? cap * 2 : 8;
			grown = realloc(names, cap * sizeof(*names));
			if (!grown) {
				fputs("schema: out of memory\n", stderr);
				abort();
			}
			names = grown;
		}
		names[n++] = xstrndup(de->d_name, strlen(de->d_name));
	}
	if (n)
		qsort(names, n, sizeof(*names), name_qsort_cmp);
	docs = xcalloc(n, sizeof(*docs));
	for (loaded = 0; loaded < n; loaded++) {
		docs[loaded] = load_file(dirfd(d), names[loaded], err, errlen);
		if (!docs[loaded])
			goto out;
	}
	set = build_set(docs, names, n, err, errlen);
out:
	for (size_t i = 0; i < loaded && docs; i++)
		json_decref(docs[i]);
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	free(docs);
	closedir(d);
	return set;
}

void schema_set_free(schema_set *set)
{
	if (!set)
		return;
	for (size_t i = 0; i < set->count; i++)
		type_clear(&set->types[i]);
	free(set->types);
	free(set->by_name);
	free(set);
}

/* ---------------------------------------------------------------- lookups */

size_t schema_set_count(const schema_set *set)
{
	return set ? set->count : 0;
}

const schema_type *schema_set_at(const schema_set *set, size_t i)
{
	if (!set || i >= set->count)
		return NULL;
	return &set->types[i];
}

const schema_type *schema_set_find(const schema_set *set, const char *name,
				   size_t len)
{
	size_t lo = 0, hi;

	if (!set || !name)
		return NULL;
	hi = set->count;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = type_name_cmp(set->by_name[mid], name, len);

		if (c == 0)
			return set->by_name[mid];
		if (c > 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

const char *schema_type_name(const schema_type *t)
{
	return t ? t->name : NULL;
}

const json_t *schema_type_json(const schema_type *t)
{
	return t ? t->doc : NULL;
}

const struct anom_spec *schema_type_anomaly(const schema_type *t)
{
	return t ? t->anom : NULL;
}

const schema_node *schema_type_telemetry(const schema_type *t)
{
	return t ? t->telemetry : NULL;
}

const schema_node *schema_type_command(const schema_type *t, const char *name)
{
	size_t lo = 0, hi;

	if (!t || !name)
		return NULL;
	hi = t->ncmds;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(name, t->cmds[mid].name);

		if (c == 0)
			return t->cmds[mid].node;
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* ------------------------------------------------------------- validation */

struct vctx {
	schema_error *errs;
	int max_errs;
	int count;
	char path[sizeof(((schema_error *)0)->path)];
};

__attribute__((format(printf, 4, 5)))
static void add_error(struct vctx *c, struct ppos at, const char *code,
		      const char *fmt, ...)
{
	if (c->count < c->max_errs) {
		schema_error *e = &c->errs[c->count];
		va_list ap;

		path_copy(e->path, sizeof(e->path), c->path, at);
		e->code = code;
		va_start(ap, fmt);
		vsnprintf(e->message, sizeof(e->message), fmt, ap);
		va_end(ap);
	}
	c->count++;
}

static int stopped(const struct vctx *c)
{
	return c->count >= SCHEMA_MAX_ERRORS;
}

/* Code points of valid UTF-8 (jansson checks strings on the way in). */
static size_t utf8_len(const char *s, size_t n)
{
	size_t cps = 0;

	for (size_t i = 0; i < n; i++)
		cps += ((unsigned char)s[i] & 0xC0) != 0x80;
	return cps;
}

static int kind_ok(enum kind k, const json_t *v)
{
	switch (k) {
	case K_ANY:
		return 1;
	case K_OBJECT:
		return json_is_object(v);
	case K_NUMBER:
		return json_is_number(v);
	case K_INTEGER:
		return json_is_integer(v);
	case K_STRING:
		return json_is_string(v);
	case K_BOOLEAN:
		return json_is_boolean(v);
	case K_ARRAY:
		return json_is_array(v);
	}
	return 0;
}

static void walk(struct vctx *c, const schema_node *n, const json_t *v,
		 struct ppos at);

static void walk_string(struct vctx *c, const schema_node *n, const json_t *v,
			struct ppos at)
{
	const char *s = json_string_value(v);
	size_t len = json_string_length(v);

	/* A code point is 1 to 4 bytes: count them only when the byte length
	 * alone cannot decide. */
	if ((n->flags & F_MIN_LEN) &&
	    (len < n->min_len ||
	     (len / 4 < n->min_len && utf8_len(s, len) < n->min_len)))
		add_error(c, at, "minLength", "must be at least %zu characters",
			  n->min_len);
	if ((n->flags & F_MAX_LEN) && len > n->max_len &&
	    utf8_len(s, len) > n->max_len) {
		/* Already invalid: spare regexec() an over-long string. */
		add_error(c, at, "maxLength", "must be at most %zu characters",
			  n->max_len);
		return;
	}
	if (n->flags & F_PATTERN) {
		regmatch_t m[1];
		int ok = 0;

		if (len <= INT_MAX) {
			m[0].rm_so = 0;
			m[0].rm_eo = (regoff_t)len;
			ok = regexec(&n->re, s, 1, m, REG_STARTEND) == 0;
		}
		if (!ok)
			add_error(c, at, "pattern", "%s", n->pattern_msg);
	}
}

static void walk_array(struct vctx *c, const schema_node *n, const json_t *v,
		       struct ppos at)
{
	size_t len = json_array_size(v);

	if ((n->flags & F_MAX_ITEMS) && len > n->max_items)
		add_error(c, at, "maxItems", "must have at most %zu items",
			  n->max_items);
	if (!n->items)
		return;
	for (size_t i = 0; i < len && !stopped(c); i++) {
		char idx[32];
		int k = snprintf(idx, sizeof(idx), "[%zu]", i);
		struct ppos sub = path_push(c->path, sizeof(c->path), at, idx,
					    (size_t)k);

		walk(c, n->items, json_array_get(v, i), sub);
		path_cut(c->path, at);
	}
}

static void walk_object(struct vctx *c, const schema_node *n, const json_t *v,
			struct ppos at)
{
	size_t seen = 0;
	void *it;

	if (n->nprops == 0 && !(n->flags & F_NO_ADDITIONAL))
		return;
	for (it = json_object_iter((json_t *)v); it && !stopped(c);
	     it = json_object_iter_next((json_t *)v, it)) {
		const char *key = json_object_iter_key(it);
		size_t klen = json_object_iter_key_len(it);
		const struct schema_prop *p = prop_find(n->props, n->nprops,
							key, klen);
		struct ppos sub;

		if (p && p->required)
			seen++;
		if (p && !p->node)
			continue;
		if (!p && !(n->flags & F_NO_ADDITIONAL))
			continue;
		sub = path_key(c->path, sizeof(c->path), at, key, klen);
		if (p)
			walk(c, p->node, json_object_iter_value(it), sub);
		else
			add_error(c, sub, "additionalProperties", "is not allowed");
		path_cut(c->path, at);
	}
	if (seen == n->nreq)
		return;
	for (size_t i = 0; i < n->nreq && !stopped(c); i++) {
		const struct schema_prop *p = &n->props[n->req[i]];
		struct ppos sub;

		if (json_object_getn(v, p->name, p->len))
			continue;
		sub = path_key(c->path, sizeof(c->path), at, p->name, p->len);
		add_error(c, sub, "required", "is required");
		path_cut(c->path, at);
	}
}

static void walk(struct vctx *c, const schema_node *n, const json_t *v,
		 struct ppos at)
{
	if (!v) {
		add_error(c, at, "required", "is required");
		return;
	}
	if (!kind_ok(n->kind, v)) {
		add_error(c, at, "type", "%s", kinds[n->kind].message);
		return;
	}
	if (n->enum_vals) {
		size_t i, count = json_array_size(n->enum_vals);

		for (i = 0; i < count; i++) {
			if (json_equal(v, json_array_get(n->enum_vals, i)))
				break;
		}
		if (i == count)
			add_error(c, at, "enum",
				  "must be one of the allowed values");
	}
	switch (json_typeof(v)) {
	case JSON_INTEGER:
	case JSON_REAL:
		if ((n->flags & F_MIN) && cmp_bound(v, &n->min) < 0)
			add_error(c, at, "minimum", "must be >= %s", n->min.text);
		if ((n->flags & F_MAX) && cmp_bound(v, &n->max) > 0)
			add_error(c, at, "maximum", "must be <= %s", n->max.text);
		break;
	case JSON_STRING:
		walk_string(c, n, v, at);
		break;
	case JSON_ARRAY:
		walk_array(c, n, v, at);
		break;
	case JSON_OBJECT:
		walk_object(c, n, v, at);
		break;
	default:
		break;
	}
}

int schema_validate(const schema_node *node, const json_t *value,
		    const char *prefix, schema_error *errs, int max_errs)
{
	struct vctx c;
	struct ppos at = { 0, 0 };

	if (!node)
		return 0;
	c.errs = errs;
	c.max_errs = errs && max_errs > 0 ? max_errs : 0;
	c.count = 0;
	c.path[0] = '\0';
	if (prefix)
		at = path_str(c.path, sizeof(c.path), at, prefix);
	walk(&c, node, value, at);
	return c.count;
}
