#!/bin/sh
# The dispatcher of the reference extension (vmsnapshot-wire.md section 1.2).
log_folder=$(sed -n 's/.*"logFolder" *: *"\([^"]*\)".*/\1/p' ./HandlerEnvironment.json | head -n 1)
log() {
    [ -n "$log_folder" ] && echo "$(date -u '+%Y-%m-%d %H:%M:%S') $*" >> "$log_folder/shell.log"
}
cmd=$1
case "$cmd" in
    install)
        mkdir -p /etc/azure
        log "install: /etc/azure ready"
        exit 0 ;;
    enable|daemon) ;;
    *)
        log "The command is $cmd, exiting"
        exit 0 ;;
esac
seq=${ConfigSequenceNumber:--1}
for x in python3.8 python3.7 python3.6 python3.5 python3.4 python3.3 python3 python2.7 python2.6 python2 python; do
    for dir in /usr/bin /usr/local/bin; do
        if [ -x "$dir/$x" ]; then
            log "$cmd with $dir/$x, seqNo $seq"
            "$dir/$x" main/handle.py "-seqNo:$seq" "-$cmd" && exit 0
        fi
    done
done
log "no python found"
exit 3
