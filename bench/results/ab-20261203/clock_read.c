#include <stdio.h>
#include <time.h>
static double run(clockid_t id, long n) {
  struct timespec a, b, t; clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) clock_gettime(id, &t);
  clock_gettime(CLOCK_MONOTONIC, &b);
  return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}
int main(void) { for (int r = 0; r < 3; r++) printf("MONOTONIC %.1f ns  MONOTONIC_COARSE %.1f ns\n", run(CLOCK_MONOTONIC, 20000000), run(CLOCK_MONOTONIC_COARSE, 20000000)); }
