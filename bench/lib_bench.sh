# Shared shell functions of the merge benchmarks (bench/merge_sd15.sh, bench/merge_sdxl.sh); source it.
# The caller sets $data (data dir) and $logs (log dir) and defines before_run LABEL, run before every
# timed run outside the timed region (keep the page cache warm, remove stale outputs, ...).

# bench_inputs MAKE_SCRIPT BASE LORA FOLDER: builds loratool (sets $bin) and runs the data generator
# MAKE_SCRIPT (with $py, the fixtures venv unless PYTHON is set) when any of the inputs is missing.
py=${PYTHON:-/work/fixtures-venv/bin/python}
bench_inputs() {
    local make=$1 base=$2 lora=$3 folder=$4
    mkdir -p "$data"
    cargo build --release --quiet
    bin=target/release/loratool
    if [ ! -f "$base" ] || [ ! -f "$lora" ] || [ ! -f "$folder/model_index.json" ]; then
        "$py" "$make" "$data"
    fi
}

# Wait until the machine is quiet: total CPU busy < 25% of all cores over 3 s, re-checking every
# 60 s. The waiting is budgeted over the whole script: WAIT_BUDGET seconds in all (default 900 =
# 15 min); once spent, runs are timed anyway and the numbers flagged (contended=1).
# Prints the ps head it judged by.
contended=0
wait_left=${WAIT_BUDGET:-900}
cpu_busy() {   # percent of all cores busy over 3 s
    local a b
    a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
    local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}
wait_quiet() {
    while :; do
        local busy
        busy=$(cpu_busy)
        if [ "$busy" -lt 25 ]; then
            echo "  [quiet] CPU busy ${busy}% over 3 s before: $1"
            return 0
        fi
        echo "  [busy] CPU busy ${busy}% before $1 (wait budget left ${wait_left}s); top processes:"
        ps aux --sort=-%cpu | head -5 | cut -c1-160 | sed 's/^/    /'
        if [ "$wait_left" -le 0 ]; then
            echo "  [busy] wait budget spent; timing anyway (numbers flagged)"
            contended=1
            return 0
        fi
        sleep 60; wait_left=$((wait_left - 63))
    done
}

# After a timed run: was something else busy (e.g. a job that started meanwhile)? Status 1 if so.
check_after() {
    local busy
    busy=$(cpu_busy)
    if [ "$busy" -ge 25 ]; then
        echo "  [busy] CPU busy ${busy}% right after $1 (it may have been contended); top processes:"
        ps aux --sort=-%cpu | head -5 | cut -c1-160 | sed 's/^/    /'
        return 1
    fi
    echo "  [quiet] CPU busy ${busy}% over 3 s after: $1"
}

# run_timed LABEL CMD...: one run; appends "secs rss_kib" to $logs/LABEL.times; output to $logs/LABEL.out
run_timed() {
    local label=$1; shift
    local s e
    s=$(date +%s.%N)
    /usr/bin/time -f %M -o "$logs/$label.rss" "$@" >"$logs/$label.out" 2>&1 || {
        echo "FAILED: $* (exit $?)"; cat "$logs/$label.out"; exit 1; }
    e=$(date +%s.%N)
    echo "$(echo "$e - $s" | bc -l) $(tail -1 "$logs/$label.rss")" >>"$logs/$label.times"
}
# best LABEL -> "secs rss" of the fastest run; maxrss LABEL -> largest peak RSS over the runs
best() { sort -n "$logs/$1.times" | head -1 | awk '{printf "%.3f", $1}'; }
maxrss() { sort -k2 -n "$logs/$1.times" | tail -1 | awk '{print $2}'; }
mib() { awk -v k="$1" 'BEGIN{printf "%.0f MiB", k / 1024}'; }
size() { du -sb "$1" | cut -f1 | awk '{printf "%.3f GB", $1 / 1e9}'; }

# timed LABEL RUNS CMD...: RUNS accepted runs, each preceded by before_run + wait_quiet and followed by
# check_after; a run after which the machine was busy is discarded and redone (at most 3 redos
# per section, and only while wait budget is left; otherwise it is kept and the numbers flagged).
timed() {
    local label=$1 runs=$2 redo=0 done_=0; shift 2
    while [ "$done_" -lt "$runs" ]; do
        before_run "$label"
        wait_quiet "$label run $((done_ + 1))/$runs"
        run_timed "$label" "$@"
        sync
        rm -f "$data/copy.safetensors"; sync
        if check_after "$label run $((done_ + 1))/$runs"; then
            done_=$((done_ + 1))
        elif [ "$redo" -lt 3 ] && [ "$wait_left" -gt 0 ]; then
            redo=$((redo + 1)); sed -i '$d' "$logs/$label.times"
            echo "  discarded that $label run (redo $redo of 3)"
        else
            contended=1; done_=$((done_ + 1))
        fi
    done
}

# merge_summary TITLE RUNS FILES: the summary both merge benchmarks end with (best-of-RUNS wall time
# and peak RSS of cp, cp + fsync, loratool and the peer, all runs, ratios). FILES is the sizes line.
# Uses $bin, $py and the labels cp, cp_fsync, loratool, peer.
merge_summary() {
    local title=$1 runs=$2 files=$3 cpu t_cp t_cpf t_lt t_peer
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    t_cp=$(best cp); t_cpf=$(best cp_fsync); t_lt=$(best loratool); t_peer=$(best peer)
    echo
    echo "== loratool merge output (last timed run; stdout+stderr)"
    cat "$logs/loratool.last.out"
    echo
    echo "== summary: $title"
    echo "machine:  $(nproc) cores, $cpu, $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
    echo "versions: $("$bin" --version), $("$py" -c 'import diffusers, torch, peft; print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, peft {peft.__version__}")' 2>/dev/null)"
    echo "files:    $files"
    printf "%-48s %9s %12s\n" "" "wall (s)" "peak RSS"
    printf "%-48s %9s %12s\n" "cp checkpoint (I/O floor, best of $runs)" "$t_cp" "$(mib "$(maxrss cp)")"
    printf "%-48s %9s %12s\n" "cp + fsync of copy (durable floor, best of $runs)" "$t_cpf" "$(mib "$(maxrss cp_fsync)")"
    printf "%-48s %9s %12s\n" "loratool merge (best of $runs)" "$t_lt" "$(mib "$(maxrss loratool)")"
    printf "%-48s %9s %12s\n" "peer: diffusers load+fuse_lora+save (1 run)" "$t_peer" "$(mib "$(maxrss peer)")"
    echo "all runs (s/KiB): cp: $(awk '{printf "%.3f/%s ", $1, $2}' "$logs/cp.times")| cp+fsync: $(awk '{printf "%.3f/%s ", $1, $2}' "$logs/cp_fsync.times")| loratool: $(awk '{printf "%.3f/%s ", $1, $2}' "$logs/loratool.times")"
    grep '^peer' "$logs/peer.out" || true
    echo "ratios:   loratool/cp = $(echo "$t_lt / $t_cp" | bc -l | xargs printf '%.2f'),  loratool/(cp+fsync) = $(echo "$t_lt / $t_cpf" | bc -l | xargs printf '%.2f'),  peer/loratool = $(echo "$t_peer / $t_lt" | bc -l | xargs printf '%.2f')"
    if [ "$contended" = 1 ]; then
        echo "WARNING: some timed runs were taken on a busy machine (wait budget spent or 3 redos; see [busy] lines above)"
    fi
}
