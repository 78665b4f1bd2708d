module github.com/mmtls/mmtls

go 1.26.7

require (
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/mattermost/mattermost/server/public v0.4.4 // indirect
	github.com/spf13/cobra v1.10.2 // indirect
	github.com/spf13/pflag v1.0.9 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
