#include <stdio.h>
#include <time.h>
static double bench(clockid_t c, const char*name){
  struct timespec t0,t1,ts; long n=20000000; unsigned long acc=0;
  clock_gettime(CLOCK_MONOTONIC,&t0);
  for(long i=0;i<n;i++){clock_gettime(c,&ts); acc+=ts.tv_nsec;}
  clock_gettime(CLOCK_MONOTONIC,&t1);
  double ns=((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/n;
  printf("%-24s %.1f ns/read (%lu)\n",name,ns,acc&1); return ns;}
int main(){for(int r=0;r<3;r++){
 bench(CLOCK_MONOTONIC,"CLOCK_MONOTONIC");
 bench(CLOCK_BOOTTIME,"CLOCK_BOOTTIME");
 bench(CLOCK_REALTIME,"CLOCK_REALTIME");
 bench(CLOCK_REALTIME_COARSE,"CLOCK_REALTIME_COARSE");
 bench(CLOCK_MONOTONIC_COARSE,"CLOCK_MONOTONIC_COARSE");}}
