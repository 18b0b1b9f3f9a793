/*
 * jparse.c - a one-pass JSON parser that builds jansson values.
 *
 * json_loadb() reads its input through a function pointer one byte at a
 * time, copies every token into a growable buffer and converts numbers with
 * strtoll/strtod: ~18,000 instructions for a 90-byte reading. Here the bytes
 * are walked once with a pointer, strings without escapes go straight from
 * the buffer into json_stringn_nocheck(), numbers are converted while they
 * are scanned, and the nesting is an explicit stack, not recursion.
 *
 * The contract is jansson 2.14 with JSON_REJECT_DUPLICATES: same accepted
 * inputs, json_equal values, bit-identical reals. Its quirks are copied on
 * purpose (see jp_skip_lost_nul() and JP_MAX_DEPTH); tests/fuzz/fuzz_jparse.c
 * checks the two against each other.
 */
#include "protocols/jparse.h"

#include <errno.h>
#include <float.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "hub/util.h"

/*
 * jansson's JSON_PARSER_MAX_DEPTH. jansson counts every value, scalars too:
 * 2048 nested empty arrays parse, a scalar inside 2048 arrays does not.
 */
#define JP_MAX_DEPTH 2048

/* Frames kept inside struct jp; deeper documents get a heap stack. (Both
 * sizes may be overridden, e.g. to 1, to exercise the spill paths.) */
#ifndef JP_INLINE_FRAMES
#define JP_INLINE_FRAMES 32
#endif

/*
 * Duplicate keys: a small object's keys are compared with memcmp against the
 * keys already seen (pointers into the buffer), which is much cheaper than
 * json_object_getn() hashing each key. An object with more keys, an escaped
 * key, or no room left falls back to json_object_getn() for the rest of its
 * keys; that is always correct because every earlier key is in the object.
 */
#define JP_KEYS 128
#define JP_KEYS_PER_OBJECT 16

/* Inline room for a decoded (escaped) string before it needs the heap. */
#ifndef JP_BUF_INLINE
#define JP_BUF_INLINE 256
#endif

struct jp_buf {
	char *p;		/* inl, or a malloc'ed block of cap bytes */
	size_t cap;
	char inl[JP_BUF_INLINE];
};

struct jp_frame {
	json_t *c;		/* the open object or array */
	unsigned kbase;		/* its first record in jp->keys */
	unsigned char obj;	/* c is an object */
	unsigned char tracked;	/* all its keys are in jp->keys */
};

struct jp_key {
	const char *s;
	size_t n;
};

struct jp {
	const unsigned char *base, *end;
	json_error_t *err;
	/* Escaped keys and string values decode into different buffers: a
	 * key must survive its value being decoded. */
	struct jp_buf kbuf, sbuf;
	struct jp_frame *fr;
	unsigned depth;		/* open containers */
	unsigned nkeys;
	struct jp_frame inl[JP_INLINE_FRAMES];
	struct jp_key keys[JP_KEYS];
};

/* String bytes: 0 plain ASCII, 1 '"', 2 '\\', 3 control, 4 non-ASCII. */
enum { JP_PLAIN, JP_QUOTE, JP_BSLASH, JP_CTRL, JP_HIGH };

static const unsigned char jp_sclass[256] = {
	[0x00 ... 0x1f] = JP_CTRL,
	['"'] = JP_QUOTE,
	['\\'] = JP_BSLASH,
	[0x80 ... 0xff] = JP_HIGH,
};

/*
 * Eight bytes at a time where the buffer allows (SWAR: bit tricks on a
 * uint64_t): string runs and digit runs are most of a telemetry frame. The
 * byte order matters only for which end of the word comes first.
 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define JP_SWAR 1
#endif

#define JP_ONES UINT64_C(0x0101010101010101)

static inline uint64_t jp_load8(const unsigned char *p)
{
	uint64_t x;

	memcpy(&x, p, sizeof(x));
	return x;
}

static void jp_fail(struct jp *jp, const unsigned char *at,
		    enum json_error_code code, const char *text)
{
	json_error_t *e = jp->err;
	const unsigned char *q, *bol = jp->base;
	size_t pos = (size_t)(at - jp->base);
	int line = 1;

	if (!e)
		return;
	/* Only on error, so counting lines here costs the hot path nothing. */
	for (q = jp->base; q < at; q++) {
		if (*q == '\n') {
			line += line < INT32_MAX;
			bol = q + 1;
		}
	}
	e->line = line;
	e->column = at - bol >= INT32_MAX ? INT32_MAX : (int)(at - bol) + 1;
	e->position = pos > INT32_MAX ? INT32_MAX : (int)pos;
	strncpy(e->text, text, JSON_ERROR_TEXT_LENGTH - 2);
	e->text[JSON_ERROR_TEXT_LENGTH - 2] = '\0';
	/* Where jansson keeps the code that json_error_code() returns. */
	e->text[JSON_ERROR_TEXT_LENGTH - 1] = (char)code;
}

static void jp_fail_end(struct jp *jp)
{
	jp_fail(jp, jp->end, json_error_premature_end_of_input,
		"unexpected end of input");
}

static void jp_oom(struct jp *jp, const unsigned char *at)
{
	jp_fail(jp, at, json_error_out_of_memory, "out of memory");
}

static inline const unsigned char *jp_ws(const unsigned char *p,
					 const unsigned char *end)
{
	while (p < end && *p <= ' ' &&
	       (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
		p++;
	return p;
}

/*
 * jansson reads the byte after a number or a true/false/null, sees that it
 * ends the token and puts it back; a NUL byte put back is lost (its stream
 * takes a NUL in its one-character buffer for "empty"). So "[1\0]" parses
 * as [1], "[1\0\0]" does not. Mirror that: one NUL right after such a token
 * is skipped.
 */
static inline const unsigned char *jp_skip_lost_nul(const unsigned char *p,
						    const unsigned char *end)
{
	if (p < end && *p == '\0')
		p++;
	return p;
}

/*
 * Length of the well-formed UTF-8 sequence at p (lead byte >= 0x80), or 0:
 * no overlongs, no UTF-16 surrogates, nothing above U+10FFFF, nothing cut
 * short by the end of the buffer. The same rules as jansson's utf.c.
 */
static size_t jp_utf8(const unsigned char *p, const unsigned char *end)
{
	size_t left = (size_t)(end - p);
	unsigned c = p[0], lo = 0x80, hi = 0xbf;

	if (c < 0xc2)
		return 0;
	if (c < 0xe0) {
		if (left < 2 || (p[1] & 0xc0) != 0x80)
			return 0;
		return 2;
	}
	if (c < 0xf0) {
		if (c == 0xe0)
			lo = 0xa0;
		else if (c == 0xed)
			hi = 0x9f;
		if (left < 3 || p[1] < lo || p[1] > hi || (p[2] & 0xc0) != 0x80)
			return 0;
		return 3;
	}
	if (c < 0xf5) {
		if (c == 0xf0)
			lo = 0x90;
		else if (c == 0xf4)
			hi = 0x8f;
		if (left < 4 || p[1] < lo || p[1] > hi ||
		    (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80)
			return 0;
		return 4;
	}
	return 0;
}

/* Makes b hold at least n bytes. Returns 0, or -1 when out of memory. */
static int jp_reserve(struct jp_buf *b, size_t n)
{
	char *p;

	if (n <= b->cap)
		return 0;
	p = malloc(n);
	if (!p)
		return -1;
	if (b->p != b->inl)
		free(b->p);
	b->p = p;
	b->cap = n;
	return 0;
}

static void jp_buf_init(struct jp_buf *b)
{
	b->p = b->inl;
	b->cap = sizeof(b->inl);
}

static void jp_buf_free(struct jp_buf *b)
{
	if (b->p != b->inl)
		free(b->p);
}

/* The value of 4 hex digits at p, or -1. */
static long jp_hex4(const unsigned char *p)
{
	long v = 0;
	int i;

	for (i = 0; i < 4; i++) {
		int d = hub_hex_val(p[i]);

		if (d < 0)
			return -1;
		v = v << 4 | d;
	}
	return v;
}

/*
 * Decodes the \uXXXX escape (or surrogate pair) at *pp, p pointing at the
 * 'u', into t. Returns the bytes written, or 0 on error (set).
 */
static size_t jp_uescape(struct jp *jp, const unsigned char **pp, char *t)
{
	const unsigned char *p = *pp, *end = jp->end;
	long u, lo;

	if (end - p < 5 || (u = jp_hex4(p + 1)) < 0) {
		jp_fail(jp, p, json_error_invalid_syntax, "invalid \\u escape");
		return 0;
	}
	p += 5;
	if (u >= 0xdc00 && u <= 0xdfff) {
		jp_fail(jp, p - 6, json_error_invalid_syntax,
			"lone UTF-16 surrogate in \\u escape");
		return 0;
	}
	if (u >= 0xd800 && u <= 0xdbff) {
		if (end - p < 6 || p[0] != '\\' || p[1] != 'u' ||
		    (lo = jp_hex4(p + 2)) < 0xdc00 || lo > 0xdfff) {
			jp_fail(jp, p - 6, json_error_invalid_syntax,
				"lone UTF-16 surrogate in \\u escape");
			return 0;
		}
		p += 6;
		u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
	}
	if (u == 0) {
		jp_fail(jp, p - 6, json_error_null_character,
			"\\u0000 is not allowed");
		return 0;
	}
	*pp = p;
	if (u < 0x80) {
		t[0] = (char)u;
		return 1;
	}
	if (u < 0x800) {
		t[0] = (char)(0xc0 | u >> 6);
		t[1] = (char)(0x80 | (u & 0x3f));
		return 2;
	}
	if (u < 0x10000) {
		t[0] = (char)(0xe0 | u >> 12);
		t[1] = (char)(0x80 | (u >> 6 & 0x3f));
		t[2] = (char)(0x80 | (u & 0x3f));
		return 3;
	}
	t[0] = (char)(0xf0 | u >> 18);
	t[1] = (char)(0x80 | (u >> 12 & 0x3f));
	t[2] = (char)(0x80 | (u >> 6 & 0x3f));
	t[3] = (char)(0x80 | (u & 0x3f));
	return 4;
}

/*
 * The first byte at or after p that is not plain ASCII string content
 * ('"', '\\', a control character or a byte >= 0x80), or end.
 *
 * With SSE2 (every x86-64), 16 bytes per step: as signed bytes, "below
 * 0x20" is exactly "control or >= 0x80". Otherwise 8 per step in a word: a
 * byte's high bit ends up set in m when it is '"' or '\\' (it XORs to zero,
 * and zero - 1 borrows), below 0x20 (- 0x20 borrows) or >= 0x80. A borrow
 * can flag bytes after the first hit but never before it, so the lowest
 * set bit is the first special byte.
 */
static inline const unsigned char *jp_plain_run(const unsigned char *p,
						const unsigned char *end)
{
#ifdef __SSE2__
	const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\');
	const __m128i space = _mm_set1_epi8(' ');

	while (end - p >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
		__m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote),
							_mm_cmpeq_epi8(v, bslash)),
					   _mm_cmpgt_epi8(space, v));
		unsigned m = (unsigned)_mm_movemask_epi8(hit);

		if (m)
			return p + __builtin_ctz(m);
		p += 16;
	}
#endif
#ifdef JP_SWAR
	while (end - p >= 8) {
		uint64_t x = jp_load8(p);
		uint64_t q = x ^ (JP_ONES * '"'), b = x ^ (JP_ONES * '\\');
		uint64_t m = ((q - JP_ONES) & ~q) | ((b - JP_ONES) & ~b) |
			     (x - JP_ONES * 0x20) | x;

		m &= JP_ONES * 0x80;
		if (m)
			return p + (__builtin_ctzll(m) >> 3);
		p += 8;
	}
#endif
	while (p < end && jp_sclass[*p] == JP_PLAIN)
		p++;
	return p;
}

/*
 * The rest of a string that has an escape: start is its first byte, p the
 * first backslash. Decodes it into b. Returns the byte after the closing
 * quote with *s, *n set, or NULL on error (set).
 */
static const unsigned char *jp_string_esc(struct jp *jp,
					  const unsigned char *start,
					  const unsigned char *p,
					  struct jp_buf *b,
					  const char **s, size_t *n)
{
	const unsigned char *end = jp->end, *q = p;
	char *t;

	/* Decoding never grows a string, so its raw length bounds the copy. */
	while (q < end && *q != '"')
		q += *q == '\\' && q + 1 < end ? 2 : 1;
	if (jp_reserve(b, (size_t)(q - start) + 1)) {
		jp_oom(jp, start);
		return NULL;
	}
	t = b->p;
	memcpy(t, start, (size_t)(p - start));
	t += p - start;
	while (p < end) {
		unsigned c = *p;
		size_t k;

		switch (jp_sclass[c]) {
		case JP_PLAIN:
			q = jp_plain_run(p + 1, end);
			memcpy(t, p, (size_t)(q - p));
			t += q - p;
			p = q;
			continue;
		case JP_QUOTE:
			*s = b->p;
			*n = (size_t)(t - b->p);
			return p + 1;
		case JP_HIGH:
			k = jp_utf8(p, end);
			if (!k) {
				jp_fail(jp, p, json_error_invalid_utf8,
					"invalid UTF-8");
				return NULL;
			}
			memcpy(t, p, k);
			t += k;
			p += k;
			continue;
		case JP_CTRL:
			jp_fail(jp, p, json_error_invalid_syntax,
				"control character in string");
			return NULL;
		}
		/* A backslash. */
		if (p + 1 == end)
			break;
		switch (p[1]) {
		case '"':
		case '\\':
		case '/':
			*t++ = (char)p[1];
			break;
		case 'b':
			*t++ = '\b';
			break;
		case 'f':
			*t++ = '\f';
			break;
		case 'n':
			*t++ = '\n';
			break;
		case 'r':
			*t++ = '\r';
			break;
		case 't':
			*t++ = '\t';
			break;
		case 'u':
			p++;
			k = jp_uescape(jp, &p, t);
			if (!k)
				return NULL;
			t += k;
			continue;
		default:
			jp_fail(jp, p, json_error_invalid_syntax,
				"invalid escape");
			return NULL;
		}
		p += 2;
	}
	jp_fail_end(jp);
	return NULL;
}

/*
 * The string that starts at start, after its plain run [start, p) stopped
 * at something other than a closing quote: UTF-8 to check, an escape, an
 * error. Same contract as jp_string(); kept out of line so that the common
 * case stays small where it is inlined.
 */
static __attribute__((noinline)) const unsigned char *
jp_string_rest(struct jp *jp, const unsigned char *start,
	       const unsigned char *p, struct jp_buf *b, const char **s,
	       size_t *n, int *esc)
{
	const unsigned char *end = jp->end;
	size_t k;

	for (;;) {
		if (p == end) {
			jp_fail_end(jp);
			return NULL;
		}
		switch (jp_sclass[*p]) {
		case JP_QUOTE:
			*s = (const char *)start;
			*n = (size_t)(p - start);
			*esc = 0;
			return p + 1;
		case JP_HIGH:
			k = jp_utf8(p, end);
			if (!k) {
				jp_fail(jp, p, json_error_invalid_utf8,
					"invalid UTF-8");
				return NULL;
			}
			p = jp_plain_run(p + k, end);
			continue;
		case JP_BSLASH:
			*esc = 1;
			return jp_string_esc(jp, start, p, b, s, n);
		default:
			jp_fail(jp, p, json_error_invalid_syntax,
				"control character in string");
			return NULL;
		}
	}
}

/*
 * The string whose opening quote is at p[-1]. Returns the byte after the
 * closing quote with *s, *n set (into the buffer itself when there is no
 * escape, else into b), or NULL on error (set). *esc says which.
 */
static inline __attribute__((always_inline)) const unsigned char *
jp_string(struct jp *jp, const unsigned char *p, struct jp_buf *b,
	  const char **s, size_t *n, int *esc)
{
	const unsigned char *q = jp_plain_run(p, jp->end);

	if (q < jp->end && *q == '"') {
		*s = (const char *)p;
		*n = (size_t)(q - p);
		*esc = 0;
		return q + 1;
	}
	return jp_string_rest(jp, p, q, b, s, n, esc);
}

/*
 * strtod() of the number token [start, p): the slow path, for significands
 * of more than 19 digits or above 2^53 and for exponents out of the fast
 * range. jansson does the same (strtod, locale's decimal point), so the
 * result is the same double. Returns 0, or -1 on overflow or OOM (set).
 */
static int jp_strtod(struct jp *jp, const unsigned char *start,
		     const unsigned char *p, double *out)
{
	size_t n = (size_t)(p - start);
	char tmp[64], *s = tmp, *dot;
	char point = localeconv()->decimal_point[0];
	double d;

	if (n >= sizeof(tmp)) {
		s = malloc(n + 1);
		if (!s) {
			jp_oom(jp, start);
			return -1;
		}
	}
	memcpy(s, start, n);
	s[n] = '\0';
	if (point != '.' && (dot = strchr(s, '.')))
		*dot = point;
	errno = 0;
	d = strtod(s, NULL);
	if (s != tmp)
		free(s);
	if ((d == HUGE_VAL || d == -HUGE_VAL) && errno == ERANGE) {
		jp_fail(jp, start, json_error_numeric_overflow,
			"real number overflow");
		return -1;
	}
	*out = d;
	return 0;
}

static const double jp_pow10[] = {
	1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
	1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

static const uint64_t jp_ipow10[] = {
	1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000,
	1000000000, 10000000000, 100000000000, 1000000000000,
	10000000000000, 100000000000000, 1000000000000000,
};

#define JP_2_53 (UINT64_C(1) << 53)

/*
 * m * 10^e correctly rounded, when that can be done with one IEEE operation
 * (Clinger's fast path): m and 10^|e| are exact doubles, so one multiply or
 * divide rounds once, like strtod. Returns 0, or -1 to take the slow path.
 * Needs double arithmetic without excess precision (x87 would round twice).
 */
static inline int jp_fast_real(uint64_t m, long e, double *out)
{
#if FLT_EVAL_METHOD == 0
	if (m > JP_2_53)
		return -1;
	if (e >= 0 && e <= 22) {
		*out = (double)m * jp_pow10[e];
		return 0;
	}
	if (e < 0 && e >= -22) {
		*out = (double)m / jp_pow10[-e];
		return 0;
	}
	/* 1e23 and friends: move the surplus powers into m while exact. */
	if (e > 22 && e - 22 <= 15 && m <= JP_2_53 / jp_ipow10[e - 22]) {
		*out = (double)(m * jp_ipow10[e - 22]) * 1e22;
		return 0;
	}
#endif
	return -1;
}

static inline int jp_isdigit(unsigned c)
{
	return c - '0' < 10;
}

#ifdef JP_SWAR
/*
 * How many of the 8 bytes in x, first byte first, are ASCII digits before
 * the first that is not. A digit minus '0' is 0..9 and stays below 0x10
 * with 6 added; anything else gets a high nibble. Borrows and carries come
 * only out of non-digits, so the lowest flagged byte is exact.
 */
static inline unsigned jp_ndigits8(uint64_t x)
{
	uint64_t a = x - JP_ONES * '0';
	uint64_t m = (a | (a + JP_ONES * 6)) & (JP_ONES * 0xf0);

	return m ? (unsigned)__builtin_ctzll(m) >> 3 : 8;
}

/*
 * The value of the first n (1..8) digits in x. Shifting them to the top
 * leaves leading zeros below; then pairs, quads and the octet are combined
 * with one multiply each.
 */
static inline uint64_t jp_value8(uint64_t x, unsigned n)
{
	x <<= 8 * (8 - n);
	x = (x & (JP_ONES * 0x0f)) * 2561 >> 8;
	x = (x & UINT64_C(0x00ff00ff00ff00ff)) * 6553601 >> 16;
	return (x & UINT64_C(0x0000ffff0000ffff)) * UINT64_C(42949672960001) >> 32;
}
#endif

/*
 * The digits at p, appended to *m (which wraps after 19 digits: callers
 * count them). Returns the first byte after them.
 */
static inline const unsigned char *jp_digits(const unsigned char *p,
					     const unsigned char *end,
					     uint64_t *m)
{
	uint64_t v = *m;

#ifdef JP_SWAR
	while (end - p >= 8) {
		uint64_t x = jp_load8(p);
		unsigned n = jp_ndigits8(x);

		if (!n) {
			*m = v;
			return p;
		}
		v = v * jp_ipow10[n] + jp_value8(x, n);
		p += n;
		if (n < 8) {
			*m = v;
			return p;
		}
	}
#endif
	while (p < end && jp_isdigit(*p))
		v = v * 10 + (unsigned)(*p++ - '0');
	*m = v;
	return p;
}

/*
 * The number starting at p ('-' or a digit), by RFC 8259's grammar. Without
 * fraction and exponent it is a json_integer (an error outside json_int_t,
 * like jansson), else a json_real equal to strtod's. Returns the byte after
 * it with *out set, or NULL on error (set).
 */
static const unsigned char *jp_number(struct jp *jp, const unsigned char *p,
				      json_t **out)
{
	const unsigned char *start = p, *end = jp->end, *q;
	uint64_t m = 0;
	long nd = 0;		/* significant digits read into m */
	long e = 0;		/* m * 10^e is the value */
	int neg = 0;
	double d;

	if (*p == '-') {
		neg = 1;
		p++;
	}
	if (p < end && *p == '0') {
		p++;
		if (p < end && jp_isdigit(*p)) {
			jp_fail(jp, start, json_error_invalid_syntax,
				"leading zero in number");
			return NULL;
		}
	} else if (p < end && jp_isdigit(*p)) {
		q = p;
		p = jp_digits(p, end, &m);
		nd = p - q;
	} else {
		jp_fail(jp, p < end ? start : end, p < end ?
			json_error_invalid_syntax : json_error_premature_end_of_input,
			"invalid number");
		return NULL;
	}
	if (p == end || (*p != '.' && (*p | 0x20) != 'e')) {
		uint64_t max = (uint64_t)INT64_MAX + (uint64_t)neg;

		/* 20 digits without a leading zero exceed 2^64 - 1. */
		if (nd > 19 || m > max) {
			jp_fail(jp, start, json_error_numeric_overflow,
				neg ? "too big negative integer" :
				"too big integer");
			return NULL;
		}
		*out = json_integer(neg ? (json_int_t)(0 - m) : (json_int_t)m);
		if (!*out) {
			jp_oom(jp, start);
			return NULL;
		}
		return p;
	}

	if (*p == '.') {
		p++;
		if (p == end || !jp_isdigit(*p)) {
			jp_fail(jp, p == end ? end : start, p == end ?
				json_error_premature_end_of_input :
				json_error_invalid_syntax, "invalid number");
			return NULL;
		}
		q = p;
		/* Zeros before the first significant digit only scale. */
		if (!m)
			while (p < end && *p == '0')
				p++;
		e = q - p;
		q = p;
		p = jp_digits(p, end, &m);
		nd += p - q;
		e -= p - q;
	}
	if (p < end && (*p | 0x20) == 'e') {
		int eneg = 0;
		long x = 0;

		p++;
		if (p < end && (*p == '+' || *p == '-'))
			eneg = *p++ == '-';
		if (p == end || !jp_isdigit(*p)) {
			jp_fail(jp, p == end ? end : start, p == end ?
				json_error_premature_end_of_input :
				json_error_invalid_syntax, "invalid number");
			return NULL;
		}
		do {
			/* Past 10^6 the fast path is out anyway; strtod
			 * reads the real exponent. */
			if (x < 1000000)
				x = x * 10 + (*p - '0');
			p++;
		} while (p < end && jp_isdigit(*p));
		e += eneg ? -x : x;
	}
	/* More than 19 significant digits wrapped m: strtod decides. */
	if (nd <= 19 && m == 0)
		d = neg ? -0.0 : 0.0;	/* 0e999999 is 0, as strtod says */
	else if (nd <= 19 && !jp_fast_real(m, e, &d))
		d = neg ? -d : d;
	else if (jp_strtod(jp, start, p, &d))
		return NULL;	/* strtod read the sign itself */
	*out = json_real(d);
	if (!*out) {
		jp_oom(jp, start);
		return NULL;
	}
	return p;
}

/* Pushes container c. Returns 0, or -1 when out of memory (set). */
static int jp_push(struct jp *jp, json_t *c, int obj, const unsigned char *at)
{
	struct jp_frame *f;

	if (jp->depth == JP_INLINE_FRAMES && jp->fr == jp->inl) {
		f = malloc(JP_MAX_DEPTH * sizeof(*f));
		if (!f) {
			jp_oom(jp, at);
			return -1;
		}
		memcpy(f, jp->inl, sizeof(jp->inl));
		jp->fr = f;
	}
	f = &jp->fr[jp->depth++];
	f->c = c;
	f->kbase = jp->nkeys;
	f->obj = (unsigned char)obj;
	f->tracked = 1;
	return 0;
}

/*
 * Checks that key s (n bytes) is not already in the object of frame f, and
 * records it. Returns 0, or -1 for a duplicate (set).
 */
static inline int jp_new_key(struct jp *jp, struct jp_frame *f, const char *s,
			     size_t n, int esc, const unsigned char *at)
{
	unsigned i;

	if (!f->tracked) {
		if (!json_object_getn(f->c, s, n))
			return 0;
		goto dup;
	}
	for (i = f->kbase; i < jp->nkeys; i++)
		if (jp->keys[i].n == n && !memcmp(jp->keys[i].s, s, n))
			goto dup;
	/* An escaped key lives in kbuf, which the next key reuses. */
	if (esc || jp->nkeys == JP_KEYS ||
	    jp->nkeys - f->kbase == JP_KEYS_PER_OBJECT) {
		f->tracked = 0;
		return 0;
	}
	jp->keys[jp->nkeys].s = s;
	jp->keys[jp->nkeys].n = n;
	jp->nkeys++;
	return 0;
dup:
	jp_fail(jp, at, json_error_duplicate_key, "duplicate object key");
	return -1;
}

#define JP_WS ' ': case '\t': case '\n': case '\r'

/*
 * The parser proper: a loop over the bytes with the open containers on an
 * explicit stack. A new container is put into its parent before its
 * content is read, so on error the root alone owns everything built.
 * Whitespace is a case of each switch rather than a skip before every
 * token: gateways send compact JSON, where the token is always there.
 */
static json_t *jp_run(struct jp *jp)
{
	const unsigned char *p = jp->base, *end = jp->end, *at;
	json_t *root = NULL, *v;
	struct jp_frame *f = NULL;
	const char *k = NULL, *s;
	size_t kn = 0, n;
	int esc;

	p = jp_ws(p, end);
	if (p == end) {
		jp_fail_end(jp);
		return NULL;
	}
	if (*p == '{')
		root = json_object();
	else if (*p == '[')
		root = json_array();
	else {
		jp_fail(jp, p, json_error_invalid_syntax, "'[' or '{' expected");
		return NULL;
	}
	if (!root) {
		jp_oom(jp, p);
		return NULL;
	}
	v = root;
	at = p++;

open:
	if (jp_push(jp, v, *at == '{', at))
		goto fail;
	f = &jp->fr[jp->depth - 1];
	p = jp_ws(p, end);
	if (p < end && *p == (f->obj ? '}' : ']')) {
		p++;
		goto close;
	}
	if (!f->obj)
		goto value;

key:
	if (p == end)
		goto fail_end;
	if (*p != '"') {
		jp_fail(jp, p, json_error_invalid_syntax,
			"string or '}' expected");
		goto fail;
	}
	at = p;
	p = jp_string(jp, p + 1, &jp->kbuf, &k, &kn, &esc);
	if (!p)
		goto fail;
	if (jp_new_key(jp, f, k, kn, esc, at))
		goto fail;
	if (p < end && *p == ':') {
		p++;
	} else {
		p = jp_ws(p, end);
		if (p == end)
			goto fail_end;
		if (*p != ':') {
			jp_fail(jp, p, json_error_invalid_syntax,
				"':' expected");
			goto fail;
		}
		p++;
	}

value:
	if (p == end)
		goto fail_end;
	if (jp->depth == JP_MAX_DEPTH) {
		jp_fail(jp, p, json_error_stack_overflow,
			"maximum parsing depth reached");
		goto fail;
	}
	at = p;
	switch (*p) {
	case '"':
		p = jp_string(jp, p + 1, &jp->sbuf, &s, &n, &esc);
		if (!p)
			goto fail;
		v = json_stringn_nocheck(s, n);
		break;
	case '-':
	case '0' ... '9':
		p = jp_number(jp, p, &v);
		if (!p)
			goto fail;
		p = jp_skip_lost_nul(p, end);
		break;
	case '{':
		v = json_object();
		p++;
		break;
	case '[':
		v = json_array();
		p++;
		break;
	case 't':
		if (end - p < 4 || memcmp(p, "true", 4))
			goto bad_token;
		v = json_true();
		p = jp_skip_lost_nul(p + 4, end);
		break;
	case 'f':
		if (end - p < 5 || memcmp(p, "false", 5))
			goto bad_token;
		v = json_false();
		p = jp_skip_lost_nul(p + 5, end);
		break;
	case 'n':
		if (end - p < 4 || memcmp(p, "null", 4))
			goto bad_token;
		v = json_null();
		p = jp_skip_lost_nul(p + 4, end);
		break;
	case JP_WS:
		p = jp_ws(p + 1, end);
		goto value;
	default:
		goto bad_token;
	}
	if (!v) {
		jp_oom(jp, at);
		goto fail;
	}
	/* Both steal v, also when they fail. */
	if (f->obj ? json_object_setn_new_nocheck(f->c, k, kn, v) :
	    json_array_append_new(f->c, v)) {
		jp_oom(jp, at);
		goto fail;
	}
	if (*at == '{' || *at == '[')
		goto open;

next:
	if (p == end)
		goto fail_end;
	switch (*p) {
	case ',':
		p++;
		if (!f->obj)
			goto value;
		if (p < end && *p != '"')
			p = jp_ws(p, end);
		goto key;
	case '}':
	case ']':
		if (*p != (f->obj ? '}' : ']'))
			break;
		p++;
		goto close;
	case JP_WS:
		p = jp_ws(p + 1, end);
		goto next;
	}
	jp_fail(jp, p, json_error_invalid_syntax, f->obj ?
		"',' or '}' expected" : "',' or ']' expected");
	goto fail;

close:
	jp->nkeys = f->kbase;
	if (--jp->depth) {
		f = &jp->fr[jp->depth - 1];
		goto next;
	}
	p = jp_ws(p, end);
	if (p != end) {
		jp_fail(jp, p, json_error_end_of_input_expected,
			"end of input expected");
		goto fail;
	}
	if (jp->err)
		jp->err->position = (int)(end - jp->base > INT32_MAX ?
					  INT32_MAX : end - jp->base);
	return root;

bad_token:
	jp_fail(jp, p, json_error_invalid_syntax, "invalid token");
	goto fail;
fail_end:
	jp_fail_end(jp);
fail:
	json_decref(root);
	return NULL;
}

json_t *jparse(const char *buf, size_t len, json_error_t *err)
{
	struct jp jp;
	json_t *root;

	if (err) {
		err->line = -1;
		err->column = -1;
		err->position = 0;
		strcpy(err->source, "<buffer>");
		err->text[0] = '\0';
		err->text[JSON_ERROR_TEXT_LENGTH - 1] = json_error_unknown;
	}
	jp.err = err;
	if (!buf) {
		jp.base = jp.end = (const unsigned char *)"";
		jp_fail(&jp, jp.base, json_error_invalid_argument,
			"wrong arguments");
		return NULL;
	}
	jp.base = (const unsigned char *)buf;
	jp.end = jp.base + len;
	jp.fr = jp.inl;
	jp.depth = 0;
	jp.nkeys = 0;
	jp_buf_init(&jp.kbuf);
	jp_buf_init(&jp.sbuf);

	root = jp_run(&jp);

	if (jp.fr != jp.inl)
		free(jp.fr);
	jp_buf_free(&jp.kbuf);
	jp_buf_free(&jp.sbuf);
	return root;
}
