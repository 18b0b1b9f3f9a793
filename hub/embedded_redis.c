#include "hub/embedded_redis.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hub/log.h"
#include "hub/util.h"

#define LOCK_FILE        "iot-hub.lock"
#define PID_FILE         "redis.pid"
#define LOG_FILE         "redis.log"
#define TERM_WAIT_MS     10000   /* SIGTERM -> SIGKILL */
#define KILL_WAIT_MS     5000
#define START_WAIT_MS    10000   /* no answer at all (loading is waited for) */
#define TICK_MS          50

struct hub_embedded_redis {
	pid_t pid;
	int port;
	int lock_fd;
	char dir[PATH_MAX];
};

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000 * 1000 };

	nanosleep(&ts, NULL);
}

static int free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && !bind(fd, (struct sockaddr *)&sa, sizeof(sa)) &&
	    !getsockname(fd, (struct sockaddr *)&sa, &sl))
		port = ntohs(sa.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

/* Sends PING; blocking, start-up only. Returns 0 on +PONG, 1 while Redis
 * loads its data set (-LOADING), -1 when nothing answers. */
static int ping(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	struct timeval tv = { 0, 200000 };
	char buf[16];
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), rc = -1;
	ssize_t n;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (!connect(fd, (struct sockaddr *)&sa, sizeof(sa)) && write(fd, "PING\r\n", 6) == 6 &&
	    (n = read(fd, buf, sizeof(buf))) >= 5) {
		if (!memcmp(buf, "+PONG", 5))
			rc = 0;
		else if (n >= 8 && !memcmp(buf, "-LOADING", 8))
			rc = 1;
	}
	close(fd);
	return rc;
}

/* mkdir -p with mode for the directories it creates. */
static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);

	if (!n || n >= sizeof(buf)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, mode) && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(buf, mode) && errno != EEXIST)
		return -1;
	return 0;
}

/* ---- processes, read from /proc ------------------------------------------ */

/* True while pid exists and is not a zombie. */
static bool pid_running(pid_t pid)
{
	char path[64], buf[512];
	FILE *f;
	char *rp;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return false;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	rp = strrchr(buf, ')');
	return rp && rp[1] == ' ' && rp[2] != 'Z' && rp[2] != 'X';
}

/* True when pid is a running redis-server (by its command name, or the
 * configured binary's) whose working directory is dir: Redis chdir()s to
 * its --dir, so that is the one serving (and writing) our data directory. */
static bool is_redis_in(pid_t pid, const char *dir, const char *binary)
{
	char path[64], cwd[PATH_MAX], comm[32] = "";
	const char *base = strrchr(binary, '/');
	ssize_t n;
	FILE *f;

	if (pid <= 0 || pid == getpid() || !pid_running(pid))
		return false;
	snprintf(path, sizeof(path), "/proc/%d/cwd", (int)pid);
	n = readlink(path, cwd, sizeof(cwd) - 1);
	if (n <= 0)
		return false;
	cwd[n] = '\0';
	if (strcmp(cwd, dir))
		return false;
	snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
	if (!(f = fopen(path, "re")))
		return false;
	if (!fgets(comm, sizeof(comm), f))
		comm[0] = '\0';
	fclose(f);
	comm[strcspn(comm, "\n")] = '\0';
	base = base ? base + 1 : binary;
	/* comm is the executable's name cut to 15 bytes. */
	return !strncmp(comm, "redis-server", 12) || (*comm && !strncmp(comm, base, 15));
}

/* Stops a redis-server left behind in dir: SIGTERM (+ SIGCONT, should it be
 * stopped) so it flushes its append-only file, then SIGKILL. Returns 0 once
 * it is gone. */
static int stop_stale(pid_t pid, const char *dir, const char *binary, char *err, size_t errlen)
{
	hub_warn("embedded redis: a redis-server (pid %d) from an earlier run is still using %s: "
		 "stopping it", (int)pid, dir);
	kill(pid, SIGTERM);
	kill(pid, SIGCONT);
	for (int t = 0; t < TERM_WAIT_MS / TICK_MS && pid_running(pid); t++)
		sleep_ms(TICK_MS);
	if (is_redis_in(pid, dir, binary)) {
		hub_warn("embedded redis: pid %d did not exit within %d ms of SIGTERM: SIGKILL",
			 (int)pid, TERM_WAIT_MS);
		kill(pid, SIGKILL);
		for (int t = 0; t < KILL_WAIT_MS / TICK_MS && pid_running(pid); t++)
			sleep_ms(TICK_MS);
	}
	if (pid_running(pid) && is_redis_in(pid, dir, binary)) {
		snprintf(err, errlen, "embedded redis: cannot stop redis-server pid %d left in %s",
			 (int)pid, dir);
		return -1;
	}
	return 0;
}

/* The pid file first; then any other redis-server working in dir (one whose
 * pid file was never written, or was removed). */
static int stop_stale_all(const char *dir, const char *binary, char *err, size_t errlen)
{
	char path[PATH_MAX + 16], buf[32] = "";
	DIR *d;
	struct dirent *de;
	FILE *f;

	snprintf(path, sizeof(path), "%s/" PID_FILE, dir);
	if ((f = fopen(path, "re"))) {
		if (!fgets(buf, sizeof(buf), f))
			buf[0] = '\0';
		fclose(f);
		long pid = strtol(buf, NULL, 10);
		if (pid > 0 && pid < INT_MAX && is_redis_in((pid_t)pid, dir, binary) &&
		    stop_stale((pid_t)pid, dir, binary, err, errlen))
			return -1;
	}
	if (!(d = opendir("/proc")))
		return 0;
	while ((de = readdir(d))) {
		char *end;
		long pid = strtol(de->d_name, &end, 10);
		if (*end || pid <= 0 || pid >= INT_MAX || !is_redis_in((pid_t)pid, dir, binary))
			continue;
		if (stop_stale((pid_t)pid, dir, binary, err, errlen)) {
			closedir(d);
			return -1;
		}
	}
	closedir(d);
	return 0;
}

/* ---- the data directory --------------------------------------------------- */

/* Takes the directory's lock (kept until stop) and writes our pid in it. */
static int lock_dir(struct hub_embedded_redis *e, char *err, size_t errlen)
{
	char path[PATH_MAX + 16], buf[32];
	ssize_t n;

	snprintf(path, sizeof(path), "%s/" LOCK_FILE, e->dir);
	e->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (e->lock_fd < 0) {
		snprintf(err, errlen, "data-dir %s: cannot open %s: %s", e->dir, LOCK_FILE,
			 strerror(errno));
		return -1;
	}
	if (flock(e->lock_fd, LOCK_EX | LOCK_NB)) {
		int why = errno;
		n = pread(e->lock_fd, buf, sizeof(buf) - 1, 0);
		buf[n > 0 ? n : 0] = '\0';
		buf[strcspn(buf, "\n")] = '\0';
		if (why == EWOULDBLOCK)
			snprintf(err, errlen, "data-dir %s is in use by another iot-hub (pid %s); "
				 "one data directory serves one hub at a time", e->dir,
				 *buf ? buf : "unknown");
		else
			snprintf(err, errlen, "data-dir %s: cannot lock %s: %s", e->dir, LOCK_FILE,
				 strerror(why));
		return -1;
	}
	n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	if (ftruncate(e->lock_fd, 0) || pwrite(e->lock_fd, buf, (size_t)n, 0) != n)
		hub_warn("data-dir %s: cannot write %s: %s", e->dir, LOCK_FILE, strerror(errno));
	return 0;
}

static void write_pid_file(const char *dir, pid_t pid)
{
	char path[PATH_MAX + 16], tmp[PATH_MAX + 16], buf[32];
	int fd, n = snprintf(buf, sizeof(buf), "%d\n", (int)pid);

	snprintf(path, sizeof(path), "%s/" PID_FILE, dir);
	snprintf(tmp, sizeof(tmp), "%s/" PID_FILE ".tmp", dir);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, buf, (size_t)n) != n || close(fd) || rename(tmp, path)) {
		hub_warn("data-dir %s: cannot write %s: %s", dir, PID_FILE, strerror(errno));
		if (fd >= 0)
			unlink(tmp);
	}
}

/* ---- start / stop --------------------------------------------------------- */

/* Forks redis-server on port; returns its pid or -1. */
static pid_t spawn(const char *binary, const char *dir, int port, bool fsync_always)
{
	char portstr[16], logfile[PATH_MAX + 16];
	pid_t parent = getpid(), pid;

	snprintf(portstr, sizeof(portstr), "%d", port);
	snprintf(logfile, sizeof(logfile), "%s/" LOG_FILE, dir);
	pid = fork();
	if (pid != 0)
		return pid;
	/* The child: dies with the hub, whichever way the hub goes. */
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() != parent)
		_exit(1);
	/* Nothing of the hub's: a redis-server that outlives it (stopped, say)
	 * must not hold its stdout or stderr open. Early errors go to the log. */
	int devnull = open("/dev/null", O_RDWR);
	int logfd = open(logfile, O_WRONLY | O_CREAT | O_APPEND, 0600);
	if (devnull >= 0) {
		dup2(devnull, 0);
		dup2(devnull, 1);
		dup2(logfd >= 0 ? logfd : devnull, 2);
	}
	execlp(binary, binary, "--port", portstr, "--bind", "127.0.0.1", "--dir", dir,
	       "--appendonly", "yes", "--appendfsync", fsync_always ? "always" : "everysec",
	       "--save", "", "--logfile", logfile, "--loglevel", "notice",
	       "--daemonize", "no", "--protected-mode", "yes", (char *)NULL);
	fprintf(stderr, "embedded redis: cannot run %s: %s\n", binary, strerror(errno));
	_exit(127);
}

/* Waits for the child's PONG. Returns 0, or -1 when it died or never
 * answered (it is then reaped). */
static int await_ready(struct hub_embedded_redis *e)
{
	int quiet_ms = 0, loading_ms = 0, status;

	for (;;) {
		int p = ping(e->port);
		if (!p)
			return 0;
		if (waitpid(e->pid, &status, WNOHANG) == e->pid) {
			e->pid = 0;
			return -1; /* it died: maybe the port was taken */
		}
		if (p == 1) {
			if (loading_ms % 5000 == 0)
				hub_info("embedded redis: loading the data set from %s", e->dir);
			loading_ms += 100;
			quiet_ms = 0;
		} else if ((quiet_ms += 100) >= START_WAIT_MS) {
			break;
		}
		sleep_ms(100);
	}
	kill(e->pid, SIGKILL);
	waitpid(e->pid, NULL, 0);
	e->pid = 0;
	return -1;
}

struct hub_embedded_redis *hub_embedded_redis_start(const char *binary, const char *data_dir,
						    bool fsync_always, int *port_out,
						    char *err, size_t errlen)
{
	struct hub_embedded_redis *e = hub_xcalloc(1, sizeof(*e));
	struct stat st;

	e->lock_fd = -1;
	if (mkdir_p(data_dir, 0700) || !realpath(data_dir, e->dir)) {
		snprintf(err, errlen, "data-dir %s: %s", data_dir, strerror(errno));
		goto fail;
	}
	if (stat(e->dir, &st) || !S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "data-dir %s: not a directory", e->dir);
		goto fail;
	}
	if (lock_dir(e, err, errlen) || stop_stale_all(e->dir, binary, err, errlen))
		goto fail;
	for (int attempt = 0; attempt < 5; attempt++) {
		e->port = free_port();
		if (e->port <= 0)
			continue;
		e->pid = spawn(binary, e->dir, e->port, fsync_always);
		if (e->pid < 0) {
			snprintf(err, errlen, "embedded redis: fork: %s", strerror(errno));
			e->pid = 0;
			goto fail;
		}
		write_pid_file(e->dir, e->pid);
		if (!await_ready(e)) {
			hub_info("embedded redis: data dir %s (append-only file, appendfsync %s); "
				 "redis-server pid %d on 127.0.0.1:%d", e->dir,
				 fsync_always ? "always" : "everysec", (int)e->pid, e->port);
			*port_out = e->port;
			return e;
		}
	}
	snprintf(err, errlen, "embedded redis: %s did not start in %s (is redis-server installed? "
		 "see %s/" LOG_FILE ")", binary, e->dir, e->dir);
fail:
	if (e->lock_fd >= 0)
		close(e->lock_fd);
	free(e);
	return NULL;
}

const char *hub_embedded_redis_dir(const struct hub_embedded_redis *e)
{
	return e->dir;
}

void hub_embedded_redis_stop(struct hub_embedded_redis *e)
{
	char path[PATH_MAX + 16];

	if (!e)
		return;
	if (e->pid > 0) {
		kill(e->pid, SIGTERM);
		for (int t = 0; t < TERM_WAIT_MS / TICK_MS; t++) {
			if (waitpid(e->pid, NULL, WNOHANG) == e->pid) {
				e->pid = 0;
				break;
			}
			sleep_ms(TICK_MS);
		}
		if (e->pid > 0) {
			hub_warn("embedded redis: pid %d did not exit within %d ms of SIGTERM: SIGKILL",
				 (int)e->pid, TERM_WAIT_MS);
			kill(e->pid, SIGKILL);
			waitpid(e->pid, NULL, 0);
		}
		snprintf(path, sizeof(path), "%s/" PID_FILE, e->dir);
		unlink(path);
	}
	close(e->lock_fd);
	free(e);
}
