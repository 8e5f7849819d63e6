# common.sh - small pieces the bench scripts share (source it; POSIX sh): where the build is,
# and the reseller API's part of a bench config. Set REPO (the checkout) first.

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
