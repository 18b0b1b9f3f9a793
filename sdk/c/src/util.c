/*
 * util.c - small helpers of libiothub-gw: allocation that aborts on OOM, a
 * growable buffer, clocks, device id checks, CRC-32 for spool records.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void *gw_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p)
		abort();
	return p;
}

void *gw_xcalloc(size_t n, size_t m)
{
	void *p = calloc(n ? n : 1, m ? m : 1);

	if (!p)
		abort();
	return p;
}

void *gw_xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		abort();
	return p;
}

char *gw_xstrdup(const char *s)
{
	char *p = strdup(s);

	if (!p)
		abort();
	return p;
}

static void gbuf_grow(struct gbuf *b, size_t more)
{
	if (b->len + more + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < b->len + more + 1)
		cap *= 2;
	b->data = gw_xrealloc(b->data, cap);
	b->cap = cap;
}

void gbuf_add(struct gbuf *b, const void *p, size_t n)
{
	gbuf_grow(b, n);
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = 0;
}

void gbuf_puts(struct gbuf *b, const char *s)
{
	gbuf_add(b, s, strlen(s));
}

void gbuf_printf(struct gbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		abort();
	gbuf_grow(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

void gbuf_free(struct gbuf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

int64_t gw_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t gw_mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int gw_valid_id(const char *s)
{
	size_t n = 0;

	if (!s)
		return 0;
	for (; s[n]; n++) {
		char c = s[n];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == ':' || c == '-'))
			return 0;
		if (n >= 128)
			return 0;
	}
	return n > 0;
}

uint32_t gw_crc32(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint32_t c = 0xffffffffu;

	for (size_t i = 0; i < n; i++) {
		c ^= b[i];
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
	}
	return ~c;
}

static const char *const err_text[IOTHUB_GW_ERR__COUNT] = {
	[IOTHUB_GW_OK] = "ok",
	[IOTHUB_GW_EINVAL] = "invalid argument",
	[IOTHUB_GW_ETOOBIG] = "reading larger than a frame",
	[IOTHUB_GW_ESPOOL_FULL] = "spool full",
	[IOTHUB_GW_EIO] = "spool I/O error",
	[IOTHUB_GW_ELWS] = "libwebsockets error",
	[IOTHUB_GW_ESTOPPED] = "stopped",
	[IOTHUB_GW_ENOENT] = "no such command",
};

const char *iothub_gw_strerror(enum iothub_gw_err e)
{
	return (unsigned)e < IOTHUB_GW_ERR__COUNT ? err_text[e] : "unknown error";
}
