# Sourced by scripts/test.sh and .ci/run: the system packages the tests need (Debian names).
# As root on Debian they are installed, all in one apt-get call; otherwise this stops at once
# with the one command that installs what is missing.
ensure_system_packages() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the tests need more system packages; install them with:" >&2
    echo "  sudo apt-get install ${missing[*]}" >&2
    echo "(other systems: Python 3 with pip and venv, Node.js with npm, Chromium and ChromeDriver)" >&2
    exit 1
  fi
}
