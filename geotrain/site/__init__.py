"""What runs on a site: the site agent (geotrain.site.agent), its Ray workers, the
preemption watchers (geotrain.site.preemption) and the local notice server that tests
and the local provider preempt through (geotrain.site.notice_server)."""
