#!/usr/bin/env bash
# cgdiff.sh DIR_A DIR_B N : per-request instruction differences by function (B - A)
N=${3:-2000}
for d in $1 $2; do callgrind_annotate --inclusive=no --threshold=100 $d/callgrind.out* 2>/dev/null | grep -E "^\s*[0-9,]+ \(" | sed -E 's/ \[[^]]*\]$//; s/\( *[0-9.]+%\)//' | awk '{n=$1; gsub(",","",n); $1=""; sub(/^ +/,""); print $0 "\t" n}' | sort -t$'\t' -k1,1 > $d.fn; done
join -t$'\t' -a1 -a2 -e0 -o 0,1.2,2.2 $1.fn $2.fn | awk -F'\t' -v N=$N '{d=($3-$2)/N; if (d>3||d<-3) printf "%8.1f %8.1f %s\n", d, $3/N, substr($1,1,140)}' | sort -n
