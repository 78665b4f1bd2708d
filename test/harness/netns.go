package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// A measurement leaves state in the network stack that makes the next
// one dearer: tens of thousands of TIME_WAIT sockets (for 60 s, longer at
// times on this machine kind) crowd the ephemeral ports every later
// connect() searches, whoever made them (the client toward a backend for
// the direct target, the proxy's upstream side otherwise). With fresh
// backends alone, a proxy measured right after another target once spent
// up to a third more CPU per new TLS connection than when it ran first.
// So each measurement runs in a child process in a network namespace of
// its own (-netns, on by default): its own loopback, its own port space,
// and its TIME_WAIT sockets go with it. (Runs remain noisy on this
// machine kind: the last measurement of a run has come out the dearest
// for the whole machine, not only for the proxy, in three runs of three.
// The kernel tears a namespace down asynchronously, and its slab counts
// do not tell when that is done; repOrder keeps whatever it is from
// landing on the same target in every run.)

// measured is what a child measurement reports to the parent.
type measured struct {
	Sample sample `json:"sample"`
	Conf   string `json:"conf"`
}

// measureInNetns runs one measurement (the memory figures or the load
// figures, see measure) in a child harness in a new network namespace and
// returns its figures.
func measureInNetns(self, bin, dir, name string, tlsMode, memory bool) (sample, string, error) {
	args := []string{"measure", "-target", name, "-tls=" + fmt.Sprint(tlsMode), "-memory=" + fmt.Sprint(memory), "-dir", dir, "-mmtls", bin,
		"-dur", dur.String(), "-idle", *idle, "-settle", settle.String(), "-nginx-workers", *nginxWorkers}
	cmd := exec.Command(self, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Setpgid: true}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, os.Stderr
	if err := cmd.Run(); err != nil {
		return nil, "", fmt.Errorf("measurement in its own network namespace: %w", err)
	}
	var m measured
	if err := json.Unmarshal(out.Bytes(), &m); err != nil {
		return nil, "", fmt.Errorf("measurement in its own network namespace: its report: %w", err)
	}
	return m.Sample, m.Conf, nil
}

// measureMain is the child: it brings up the namespace's loopback, takes
// one target's figures and prints them as JSON.
func measureMain(args []string) {
	fs := flag.NewFlagSet("measure", flag.ExitOnError)
	name := fs.String("target", "", "")
	tlsMode := fs.Bool("tls", false, "")
	memory := fs.Bool("memory", false, "")
	dir := fs.String("dir", "", "")
	fs.StringVar(mmtlsBin, "mmtls", "", "")
	fs.DurationVar(dur, "dur", *dur, "")
	fs.StringVar(idle, "idle", *idle, "")
	fs.DurationVar(settle, "settle", *settle, "")
	fs.StringVar(nginxWorkers, "nginx-workers", *nginxWorkers, "")
	fs.Parse(args)
	err := func() error {
		if err := loopbackUp(); err != nil {
			return err
		}
		self, err := os.Executable()
		if err != nil {
			return err
		}
		var t *target
		for _, c := range allTargets(self, *mmtlsBin, *dir) {
			if c.name == *name {
				t = &c
			}
		}
		if t == nil {
			return fmt.Errorf("-target %q: no such target", *name)
		}
		roots := x509.NewCertPool()
		pem, err := os.ReadFile(filepath.Join(*dir, "root.pem"))
		if err != nil {
			return err
		}
		if !roots.AppendCertsFromPEM(pem) {
			return errors.New("root.pem: no certificate")
		}
		cf, kf := "", ""
		if *tlsMode {
			cf, kf = filepath.Join(*dir, "cert.pem"), filepath.Join(*dir, "key.pem")
		}
		f, conf, err := measure(self, *t, *tlsMode, cf, kf, roots, *memory)
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(measured{Sample: f, Conf: conf})
	}()
	if err != nil {
		fmt.Fprintln(os.Stderr, "harness measure:", err)
		os.Exit(1)
	}
}

// loopbackUp sets IFF_UP on lo: a new network namespace starts with it down.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: read flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: bring up: %w", err)
	}
	return nil
}
