package passthrough

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ControlRequest is one request on the control socket, one JSON line.
type ControlRequest struct {
	Command  string `json:"command"` // "status", "drain" or "undrain"
	Upstream string `json:"upstream,omitempty"`
}

// ControlResponse answers it.
type ControlResponse struct {
	Error     string           `json:"error,omitempty"`
	Upstreams []UpstreamStatus `json:"upstreams,omitempty"`
}

// ServeControl answers control requests on ln (a Unix socket, which the
// caller makes mode 0600) until ctx ends. Only peers whose SO_PEERCRED uid
// is allowedUID (root: 0) are served. It returns once its goroutines have.
func (b *Balancer) ServeControl(ctx context.Context, ln *net.UnixListener, allowedUID int) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("control socket: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			b.serveControlConn(c, allowedUID)
		}()
	}
}

func (b *Balancer) serveControlConn(c *net.UnixConn, allowedUID int) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	enc := json.NewEncoder(c)
	uid, err := peerUID(c)
	if err != nil || uid != allowedUID {
		enc.Encode(ControlResponse{Error: fmt.Sprintf("permission denied (peer uid %d)", uid)})
		return
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return
	}
	var req ControlRequest
	if err := json.Unmarshal(line, &req); err != nil {
		enc.Encode(ControlResponse{Error: "bad request: " + err.Error()})
		return
	}
	var resp ControlResponse
	switch req.Command {
	case "status":
	case "drain":
		err = b.Drain(req.Upstream)
	case "undrain":
		err = b.Undrain(req.Upstream)
	default:
		err = fmt.Errorf("unknown command %q: want status, drain or undrain", req.Command)
	}
	if err != nil {
		resp.Error = err.Error()
	}
	resp.Upstreams = b.Status()
	enc.Encode(resp)
}

func peerUID(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return -1, err
	}
	if cerr != nil {
		return -1, cerr
	}
	return int(cred.Uid), nil
}

// Control sends one request to the control socket at path.
func Control(ctx context.Context, path string, req ControlRequest) (*ControlResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w (is mmtls balance running?)", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	var resp ControlResponse
	if err := json.NewDecoder(c).Decode(&resp); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if resp.Error != "" {
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}
