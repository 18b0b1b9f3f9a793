#include "hub/util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int64_t hub_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t hub_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t hub_mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Digits of s[0..len) as an unsigned value; -1 on empty, junk or overflow. */
static int parse_u64(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;

	if (!len)
		return -1;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned char)s[i] - '0';
		if (d > 9 || v > (UINT64_MAX - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	*out = v;
	return 0;
}

int hub_parse_i64(const char *s, size_t len, int64_t min, int64_t max, int64_t *out)
{
	bool neg = len && s[0] == '-';
	uint64_t u;
	int64_t v;

	if (!s || parse_u64(s + neg, len - neg, &u))
		return -1;
	if (neg ? u > (uint64_t)INT64_MAX + 1 : u > (uint64_t)INT64_MAX)
		return -1;
	v = neg ? (int64_t)(0 - u) : (int64_t)u;
	if (v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

int hub_parse_ll(const char *s, long long min, long long max, long long *out)
{
	int64_t v;

	if (!s || hub_parse_i64(s, strlen(s), min, max, &v))
		return -1;
	*out = v;
	return 0;
}

int hub_parse_pos(const char *s, size_t len, bool need_seq, uint64_t *ms, uint64_t *seq)
{
	const char *d = s ? memchr(s, '-', len) : NULL;
	uint64_t a, b = 0;

	if (!s || (!d && need_seq))
		return -1;
	if (d) {
		if (parse_u64(s, (size_t)(d - s), &a) ||
		    parse_u64(d + 1, len - (size_t)(d - s) - 1, &b))
			return -1;
	} else if (parse_u64(s, len, &a)) {
		return -1;
	}
	*ms = a;
	*seq = b;
	return 0;
}

int hub_hex_val(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int hub_unhex(const char *hex, size_t len, uint8_t *out, size_t n)
{
	if (!hex || len != 2 * n)
		return -1;
	for (size_t i = 0; i < n; i++) {
		int hi = hub_hex_val((unsigned char)hex[2 * i]);
		int lo = hub_hex_val((unsigned char)hex[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

bool hub_id_valid(const char *s, size_t len)
{
	if (!s || !len || len > HUB_ID_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '_' ||
		      c == ':' || c == '-'))
			return false;
	}
	return true;
}

static void oom(size_t n)
{
	fprintf(stderr, "iot-hub: out of memory allocating %zu bytes\n", n);
	abort();
}

void *hub_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p)
		oom(n);
	return p;
}

void *hub_xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz ? sz : 1);

	if (!p)
		oom(n * sz);
	return p;
}

void *hub_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q)
		oom(n);
	return q;
}

char *hub_xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;

	return memcpy(hub_xmalloc(n), s, n);
}

void hub_buf_reserve(hub_buf *b, size_t extra)
{
	size_t need = b->len + extra + 1;

	if (need <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < need)
		cap *= 2;
	b->data = hub_xrealloc(b->data, cap);
	b->cap = cap;
}

void hub_buf_append(hub_buf *b, const void *p, size_t n)
{
	hub_buf_reserve(b, n);
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
}

void hub_buf_puts(hub_buf *b, const char *s)
{
	hub_buf_append(b, s, strlen(s));
}

size_t hub_fmt_i64(char *out, int64_t v)
{
	char tmp[24];
	size_t n = 0, k = 0;
	uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;

	do {
		tmp[n++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	if (v < 0)
		out[k++] = '-';
	while (n)
		out[k++] = tmp[--n];
	return k;
}

size_t hub_fmt_decimal(char *out, double v)
{
	static const double pow10[] = { 1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8 };

	/* v = m / 10^k with m an integer below 2^53: both m and 10^k are exact
	 * doubles, so m / 10^k is the correctly rounded value of the decimal
	 * m * 10^-k, and so is strtod of its text. Equal to v means the text
	 * reads back as v. */
	for (size_t k = 0; k < sizeof(pow10) / sizeof(pow10[0]); k++) {
		double m = v * pow10[k];
		if (!(fabs(m) < 9007199254740992.0))
			return 0;
		if (m != (double)(int64_t)m || (double)(int64_t)m / pow10[k] != v)
			continue;
		int64_t im = (int64_t)m;
		while (k && im % 10 == 0) {    /* 0.07 * 1000 == 70 exactly */
			im /= 10;
			k--;
		}
		char digits[24];
		size_t nd = hub_fmt_i64(digits, im < 0 ? -im : im), n = 0;
		if (v < 0)
			out[n++] = '-';
		if (nd <= k) {                          /* 0.00ddd */
			out[n++] = '0';
			out[n++] = '.';
			for (size_t z = nd; z < k; z++)
				out[n++] = '0';
			memcpy(out + n, digits, nd);
			return n + nd;
		}
		memcpy(out + n, digits, nd - k);
		n += nd - k;
		if (k) {
			out[n++] = '.';
			memcpy(out + n, digits + nd - k, k);
			n += k;
		}
		return n;
	}
	return 0;
}

void hub_buf_i64(hub_buf *b, int64_t v)
{
	hub_buf_reserve(b, 21);
	b->len += hub_fmt_i64(b->data + b->len, v);
	b->data[b->len] = '\0';
}

void hub_buf_printf(hub_buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	hub_buf_reserve(b, 64);
	va_start(ap, fmt);
	n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= b->cap - b->len) {
		hub_buf_reserve(b, (size_t)n);
		va_start(ap, fmt);
		vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
	}
	b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one
 * (overlong forms, surrogates and code points past U+10FFFF are invalid). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	size_t len;
	unsigned cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		len = 2;
		cp = s[0] & 0x1f;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		len = 3;
		cp = s[0] & 0x0f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		len = 4;
		cp = s[0] & 0x07;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return len;
}

void hub_buf_json_str(hub_buf *b, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *u = (const unsigned char *)s;

	hub_buf_reserve(b, n + 2);
	b->data[b->len++] = '"';
	for (size_t i = 0; i < n; i++) {
		unsigned char c = u[i];

		if (c == '"' || c == '\\') {
			char e[2] = { '\\', (char)c };
			hub_buf_append(b, e, 2);
		} else if (c < 0x20) {
			char e[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
			hub_buf_append(b, e, 6);
		} else if (c < 0x80) {
			hub_buf_reserve(b, 1);
			b->data[b->len++] = (char)c;
		} else {
			/* Text frames must be UTF-8: invalid bytes (e.g. a peer's
			 * bytes quoted in a parser message) become U+FFFD. */
			size_t len = utf8_seq(u + i, n - i);
			if (len) {
				hub_buf_append(b, s + i, len);
				i += len - 1;
			} else {
				hub_buf_append(b, "\\ufffd", 6);
			}
		}
	}
	hub_buf_reserve(b, 1);
	b->data[b->len++] = '"';
	b->data[b->len] = '\0';
}

void hub_buf_free(hub_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

char *hub_read_file(const char *path, size_t max, size_t *len_out)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t len = 0, cap = 0;

	if (!f)
		return NULL;
	for (;;) {
		if (cap - len < 4096) {
			cap = cap ? cap * 2 : 8192;
			buf = hub_xrealloc(buf, cap + 1);
		}
		size_t n = fread(buf + len, 1, cap - len, f);
		len += n;
		if (len > max) {
			free(buf);
			fclose(f);
			errno = EFBIG;
			return NULL;
		}
		if (n == 0)
			break;
	}
	if (ferror(f)) {
		int e = errno;
		free(buf);
		fclose(f);
		errno = e ? e : EIO;
		return NULL;
	}
	fclose(f);
	buf[len] = '\0';
	if (len_out)
		*len_out = len;
	return buf;
}
