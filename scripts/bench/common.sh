# common.sh - small pieces the bench scripts share (source it; POSIX sh): where the build is,
# the start of a bench config, and its reseller API's part. Set REPO (the checkout) first.

# bench_build_dir [ARG]: the build directory ARG (default build), absolute: a relative one is
# in the checkout
bench_build_dir() {
    case ${1:-build} in
    /*) echo "$1" ;;
    *) echo "$REPO/${1:-build}" ;;
    esac
}

# bench_api_conf PORT TENANTS: an [api] section whose answers are read fresh from the index
# each time (cache 0) and whose rate limit stays out of a timing's way
bench_api_conf() {
    printf '[api]\nlisten = 127.0.0.1:%s\ntenants = %s\ncache = 0\nrate_limit = 1000\n' "$1" "$2"
    printf 'rate_burst = 1000\n'
}

# bench_tenant NAME TOKEN DOMAINS: one line of a tenants file (docs/resellers.md)
bench_tenant() {
    printf '%s sha256:%s %s\n' "$1" "$(printf %s "$2" | sha256sum | cut -d' ' -f1)" "$3"
}

# bench_conf SPOOL MIN_FREE LISTEN HOSTNAME DOMAINS RECIPIENT_MAP: [spool], [log] and the
# first lines of [gateway] of a bench config; the caller adds its own keys after them
bench_conf() {
    printf '[spool]\ndir = %s\nmin_free_space = %s\n[log]\nlevel = info\n' "$1" "$2"
    printf '[gateway]\nlisten = %s\nhostname = %s\ndomains = %s\nrecipient_map = %s\n' \
        "$3" "$4" "$5" "$6"
}
