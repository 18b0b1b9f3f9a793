#include "hub/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

int hub_log_threshold = HUB_LOG_INFO;
static char log_tag[64] = "hub";

static const char level_char[] = { 'E', 'W', 'I', 'D' };

void hub_log_set_tag(const char *tag)
{
	snprintf(log_tag, sizeof(log_tag), "%s", tag ? tag : "hub");
}

static void log_line(int level, const char *msg, size_t len)
{
	struct timeval tv;
	struct tm tm;
	char stamp[32];

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	while (len && (msg[len - 1] == '\n' || msg[len - 1] == '\r'))
		len--;
	fprintf(stderr, "%s.%03ldZ %c [%s] %.*s\n", stamp, (long)(tv.tv_usec / 1000),
		level_char[level < 0 ? 0 : level > 3 ? 3 : level], log_tag,
		(int)len, msg);
}

void hub_log_write(int level, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	log_line(level, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

int hub_log_parse_level(const char *s)
{
	static const char *names[] = { "error", "warn", "info", "debug" };

	for (int i = 0; s && i < 4; i++)
		if (!strcmp(s, names[i]))
			return i;
	return -1;
}

void hub_log_lws_emit(int lws_level, const char *line)
{
	/* lws: 1 = ERR, 2 = WARN, 4 = NOTICE, 8 = INFO, ... */
	int level = lws_level & 1 ? HUB_LOG_ERROR :
		    lws_level & 2 ? HUB_LOG_WARN :
		    HUB_LOG_DEBUG;

	if (level <= hub_log_threshold)
		log_line(level, line, strlen(line));
}
