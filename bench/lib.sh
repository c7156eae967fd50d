# Shared by the bench scripts (sourced, not run).

# Installs nats-server from Debian if it is not on the PATH.
ensure_nats_server() {
    if ! command -v nats-server >/dev/null 2>&1; then
        echo "installing nats-server from Debian..." >&2
        if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq nats-server >/dev/null
    fi
}
