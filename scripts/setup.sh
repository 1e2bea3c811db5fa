#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Install everything the harness needs, idempotently, from the package
# registries only:
#   - Debian bookworm packages (compilers, kernel build deps, udev, ...)
#   - qemu-system-x86/arm from bookworm-backports
#   - ccache, linux-perf (HOST_DEBS in lib.sh: bookworm's, pinned by version
#     and sha256, fetched with apt-get download and installed from the
#     checked file)
#   - Debian's rust-src of exactly the version of the machine's rustc
#     (trixie-backports, fetched with apt-get download, unpacked with dpkg -x)
#   - bindgen-cli from crates.io, virtme-ng from PyPI, at pinned versions
#   - arm64 user space (ARM64_DEBS in lib.sh: libelf, zlib, zstd, libssl,
#     busybox-static, coreutils from bookworm, arm64), fetched with apt-get download
#     through a private apt state ($CACHE/apt-arm64: the host's dpkg gets no
#     foreign architecture), sha256-checked, unpacked with dpkg -x into
#     ARM64_SYSROOT, never installed
#   - matplotlib (make bench's chart) from PyPI into virtme-ng's venv, every
#     wheel pinned by version and sha256 (scripts/bench-requirements.txt)
#
# The backports suites are added with a low pin priority, so nothing is ever
# upgraded from them implicitly. trixie/sid main suites are never added.
#
# Usage: scripts/setup.sh        (root, or sudo available)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

SUDO=
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || die "run as root or install sudo"
	SUDO=sudo
fi

APT_SOURCES=/etc/apt/sources.list.d/lsdefer-backports.sources
APT_PREFS=/etc/apt/preferences.d/lsdefer-backports

HOST_PKGS=(
	bc bison busybox-static cpio dwarves flex gcc git kmod libcap-dev
	libc6-dev libelf-dev libssl-dev libzstd-dev make pahole python3-venv
	pkgconf rsync shellcheck udev zlib1g-dev zstd
	"clang-$LLVM_VER" "llvm-$LLVM_VER" "lld-$LLVM_VER" "libclang-$LLVM_VER-dev"
	gcc-aarch64-linux-gnu libc6-dev-arm64-cross
)
BPO_PKGS=(qemu-system-x86 qemu-system-arm)

have_pkgs() {
	local p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
	done
}

setup_apt() {
	if [ ! -f "$APT_SOURCES" ]; then
		info "adding bookworm-backports and trixie-backports (low priority)"
		$SUDO tee "$APT_SOURCES" >/dev/null <<-EOF
			Types: deb
			URIs: http://deb.debian.org/debian
			Suites: bookworm-backports trixie-backports
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
		EOF
		$SUDO rm -f /var/lib/apt/lists/lock
		APT_UPDATED=0
	fi
	# trixie-backports: only for apt-get download of pinned, arch-all packages.
	$SUDO tee "$APT_PREFS" >/dev/null <<-EOF
		Package: *
		Pin: release n=trixie-backports
		Pin-Priority: 1

		Package: *
		Pin: release n=bookworm-backports
		Pin-Priority: 100
	EOF
}

APT_UPDATED=${APT_UPDATED:-0}
apt_update_once() {
	if [ "$APT_UPDATED" = 0 ]; then
		info "apt-get update"
		$SUDO apt-get update -qq || die "apt-get update failed"
		APT_UPDATED=1
	fi
}

# install_pinned_debs: HOST_DEBS (lib.sh), each "name version sha256":
# exactly that version downloaded and checked (download_deb), then apt-get
# install of that file (its dependencies from bookworm).
install_pinned_debs() {
	local entry name ver sum have arch deb
	for entry in "${HOST_DEBS[@]}"; do
		read -r name ver sum <<<"$entry"
		have=$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null || true)
		[ "$have" != "install ok installed $ver" ] || continue
		arch=$(dpkg --print-architecture)
		download_deb "$name" "$ver" "$sum" "$arch"
		deb=$(deb_path "$name" "$ver" "$arch")
		info "installing $name=$ver"
		$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$deb" ||
			die "apt-get install of $deb failed"
	done
}

install_pkgs() {
	if ! have_pkgs "${HOST_PKGS[@]}"; then
		apt_update_once
		info "installing host packages"
		$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends "${HOST_PKGS[@]}" ||
			die "apt-get install of host packages failed: ${HOST_PKGS[*]}"
	fi
	if ! have_pkgs "${BPO_PKGS[@]}"; then
		apt_update_once
		info "installing QEMU from bookworm-backports"
		$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}" ||
			die "apt-get install -t bookworm-backports ${BPO_PKGS[*]} failed"
	fi
}

# arm64 packages come through an apt of their own: bookworm's arm64 indexes
# in $CACHE/apt-arm64, so that the host's dpkg and apt get no foreign
# architecture (and no backports or trixie index for it).
APT_ARM64=$CACHE/apt-arm64
apt_arm64() {
	apt-get -o Dir::State="$APT_ARM64/state" -o Dir::State::status="$APT_ARM64/status" \
		-o Dir::Cache="$APT_ARM64/cache" -o Dir::Etc::SourceList="$APT_ARM64/sources.list" \
		-o Dir::Etc::SourceParts="$APT_ARM64/empty" -o Dir::Etc::Preferences="$APT_ARM64/empty/none" \
		-o Dir::Etc::PreferencesParts="$APT_ARM64/empty" \
		-o APT::Architecture=arm64 -o APT::Architectures::=arm64 "$@"
}

APT_ARM64_UPDATED=0
apt_arm64_update_once() {
	[ "$APT_ARM64_UPDATED" = 0 ] || return 0
	mkdir -p "$APT_ARM64/state/lists/partial" "$APT_ARM64/cache/archives/partial" "$APT_ARM64/empty"
	touch "$APT_ARM64/status"
	local key=/usr/share/keyrings/debian-archive-keyring.gpg
	cat >"$APT_ARM64/sources.list" <<-EOF
		deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian bookworm main
		deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian bookworm-updates main
		deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
	EOF
	info "apt-get update (bookworm arm64 indexes, $APT_ARM64)"
	apt_arm64 update -qq || die "apt-get update of the arm64 indexes ($APT_ARM64) failed"
	APT_ARM64_UPDATED=1
}

# deb_path NAME VERSION ARCH: where download_deb leaves that package.
deb_path() {
	echo "$CACHE/dl/$(echo "${1}_${2}_$3.deb" | sed 's/:/%3a/')"
}

# download_deb NAME VERSION SHA256 ARCH: apt-get download of exactly that
# version (ARCH: all or the host's from the host's suites, arm64 from
# bookworm's) to deb_path, unless there already, then its sha256 checked.
download_deb() {
	local name=$1 ver=$2 sum=$3 arch=$4 dl=$CACHE/dl deb
	mkdir -p "$dl"
	deb=$(deb_path "$name" "$ver" "$arch")
	if [ ! -f "$deb" ]; then
		info "downloading $name=$ver ($arch)"
		if [ "$arch" = arm64 ]; then
			apt_arm64_update_once
			(cd "$dl" && apt_arm64 download -q "$name:$arch=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed') ||
				die "apt-get download $name:$arch=$ver failed (bookworm $arch; a point release may have replaced $ver: update the pin in scripts/lib.sh)"
		else
			apt_update_once
			(cd "$dl" && apt-get download -q "$name=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed') ||
				die "apt-get download $name=$ver failed (is its suite reachable? a point release may have replaced $ver: update the pin in scripts/lib.sh)"
		fi
		[ -f "$deb" ] || die "apt-get download $name=$ver ($arch) did not leave $deb"
	fi
	echo "$sum  $deb" | sha256sum -c --quiet - || die "checksum mismatch for $deb (want $sum)"
}

# fetch_deb NAME VERSION SHA256 DESTDIR [ARCH]: download_deb + dpkg -x into
# DESTDIR (ARCH: all, default, or arm64). DESTDIR/.done marks a complete
# unpack; several packages may share a DESTDIR (NAME.done each).
fetch_deb() {
	local name=$1 ver=$2 sum=$3 dest=$4 arch=${5:-all} deb stamp
	stamp=$dest/.done
	[ "$arch" = all ] || stamp=$dest/.$name.done
	[ -f "$stamp" ] && return 0
	download_deb "$name" "$ver" "$sum" "$arch"
	deb=$(deb_path "$name" "$ver" "$arch")
	if [ "$arch" = all ]; then
		rm -rf "$dest"
	fi
	mkdir -p "$dest"
	dpkg -x "$deb" "$dest"
	touch "$stamp"
}

# The arm64 sysroot: ARM64_DEBS unpacked, absolute symlinks (libz.so ->
# /lib/aarch64-linux-gnu/...) made relative to it, and two wrappers the
# selftests' cross build uses for the target only (scripts/selftests-build.sh):
# aarch64-linux-gnu-gcc, which also searches the sysroot's multiarch headers
# (openssl's configuration.h) after its own and links against its libraries,
# and pkg-config, which reads the sysroot's .pc files.
setup_arm64_sysroot() {
	local entry name ver sum link target f gcc
	[ -f "$ARM64_SYSROOT/.done" ] && return 0
	gcc=$(command -v aarch64-linux-gnu-gcc) || die "aarch64-linux-gnu-gcc not found (gcc-aarch64-linux-gnu)"
	rm -rf "$ARM64_SYSROOT"
	for entry in "${ARM64_DEBS[@]}"; do
		read -r name ver sum <<<"$entry"
		fetch_deb "$name" "$ver" "$sum" "$ARM64_SYSROOT" arm64
	done
	while IFS= read -r -d '' link; do
		target=$(readlink "$link")
		case "$target" in
		/*) ln -sfn "$ARM64_SYSROOT$target" "$link" ;;
		esac
	done < <(find "$ARM64_SYSROOT" -type l -print0)
	for f in "$ARM64_LIBDIR/libelf.a" "$ARM64_LIBDIR/libz.a" "$ARM64_LIBDIR/libzstd.a" \
		"$ARM64_LIBDIR/libcrypto.a" "$ARM64_SYSROOT/bin/busybox" "$ARM64_SYSROOT/bin/rm"; do
		[ -f "$f" ] || die "arm64 sysroot $ARM64_SYSROOT: $f missing after unpacking ARM64_DEBS"
	done
	mkdir -p "$ARM64_SYSROOT/bin"
	cat >"$ARM64_SYSROOT/bin/aarch64-linux-gnu-gcc" <<-EOF
		#!/bin/sh
		# Generated by scripts/setup.sh: the cross gcc with the arm64 sysroot's
		# headers (after its own) and libraries.
		exec $gcc -idirafter "$ARM64_SYSROOT/usr/include/aarch64-linux-gnu" \
			-idirafter "$ARM64_SYSROOT/usr/include" "\$@" \
			-L"$ARM64_LIBDIR" -Wl,-rpath-link="$ARM64_LIBDIR"
	EOF
	cat >"$ARM64_SYSROOT/bin/pkg-config" <<-EOF
		#!/bin/sh
		# Generated by scripts/setup.sh: pkg-config for the arm64 sysroot.
		PKG_CONFIG_LIBDIR="$ARM64_LIBDIR/pkgconfig:$ARM64_SYSROOT/usr/share/pkgconfig" \
			PKG_CONFIG_SYSROOT_DIR="$ARM64_SYSROOT" exec pkg-config "\$@"
	EOF
	chmod 755 "$ARM64_SYSROOT/bin/aarch64-linux-gnu-gcc" "$ARM64_SYSROOT/bin/pkg-config"
	touch "$ARM64_SYSROOT/.done"
	info "arm64 sysroot ready: $ARM64_SYSROOT"
}

setup_rust() {
	local have
	command -v rustc >/dev/null || die "rustc not found (the machine's rustup toolchain $RUSTC_WANT is required)"
	have=$(rustc --version | awk '{print $2}')
	[ "$have" = "$RUSTC_WANT" ] ||
		die "rustc is $have but the pinned rust-src is $RUST_SRC_VER; install rustc $RUSTC_WANT or update RUSTC_WANT/RUST_SRC_VER in scripts/lib.sh"
	fetch_deb rust-src "$RUST_SRC_VER" "$RUST_SRC_SHA256" "$TOOLS/rust-src-$RUST_SRC_VER"
	[ -f "$RUST_LIB_SRC/core/src/lib.rs" ] ||
		die "rust-src $RUST_SRC_VER unpacked but $RUST_LIB_SRC/core/src/lib.rs is missing"
	for c in rustfmt clippy-driver; do
		command -v "$c" >/dev/null || die "$c not found: rustup component add ${c%-driver}"
	done
	if [ "$(bindgen --version 2>/dev/null | awk '{print $2}')" != "$BINDGEN_VER" ]; then
		info "cargo install bindgen-cli $BINDGEN_VER"
		cargo install -q bindgen-cli --locked --version "$BINDGEN_VER" \
			--root "$TOOLS/bindgen-$BINDGEN_VER" ||
			die "cargo install bindgen-cli@$BINDGEN_VER failed"
	fi
}

setup_vng() {
	if [ "$("$VNG_VENV/bin/vng" --version 2>/dev/null | awk '{print $2}')" != "$VNG_VER" ]; then
		info "pip install virtme-ng==$VNG_VER"
		rm -rf "$VNG_VENV"
		python3 -m venv "$VNG_VENV"
		"$VNG_VENV/bin/pip" install -q "virtme-ng==$VNG_VER" ||
			die "pip install virtme-ng==$VNG_VER failed"
	fi
}

# matplotlib for scripts/bench.py, in the same venv: wheels only, each pinned
# with its sha256 (pip --require-hashes refuses anything else).
setup_bench_py() {
	local req=$REPO/scripts/bench-requirements.txt want
	want=$(sed -n 's/^matplotlib==\([^ ]*\).*/\1/p' "$req")
	[ -n "$want" ] || die "no matplotlib pin in $req"
	if [ "$("$VNG_VENV/bin/python3" -c 'import matplotlib; print(matplotlib.__version__)' 2>/dev/null)" != "$want" ]; then
		info "pip install matplotlib==$want (hash-pinned, $req)"
		"$VNG_VENV/bin/pip" install -q --require-hashes --only-binary :all: -r "$req" ||
			die "pip install of $req failed (a wheel for this Python/arch missing, or a hash mismatch)"
	fi
}

setup_kernel_source() {
	[ -n "${KDIR:-}" ] && return 0
	local dest=$CACHE/src/$LINUX_SRC_PKG-$LINUX_SRC_VER
	if [ ! -f "$dest/.done" ]; then
		fetch_deb "$LINUX_SRC_PKG" "$LINUX_SRC_VER" "$LINUX_SRC_SHA256" "$dest.deb"
		info "unpacking $LINUX_SRC_PKG $LINUX_SRC_VER"
		rm -rf "$dest"
		mkdir -p "$dest"
		tar -C "$dest" -xf "$dest.deb/usr/src/$LINUX_SRC_PKG.tar.xz"
		rm -rf "$dest.deb"
		touch "$dest/.done"
	fi
}

setup_apt
install_pkgs
install_pinned_debs
setup_rust
setup_vng
setup_bench_py
setup_kernel_source
setup_arm64_sysroot
info "setup complete: rustc $RUSTC_WANT, rust-src $RUST_SRC_VER, bindgen $BINDGEN_VER, virtme-ng $VNG_VER, matplotlib $("$VNG_VENV/bin/python3" -c 'import matplotlib; print(matplotlib.__version__)'), $(qemu-system-x86_64 --version | head -1)"
