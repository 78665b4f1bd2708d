package agent

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// NotifyReady tells systemd that the service has started (READY=1 on
// $NOTIFY_SOCKET, the sd_notify protocol), for a Type=notify unit: `systemctl
// start` then returns once the agent runs, or fails with the agent's own
// exit status. Without $NOTIFY_SOCKET it does nothing.
func NotifyReady() error { return notify("READY=1") }

// NotifyStopping tells systemd the service is stopping.
func NotifyStopping() error { return notify("STOPPING=1") }

func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:] // an abstract socket
	}
	c, err := net.DialTimeout("unixgram", path, time.Second)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}
