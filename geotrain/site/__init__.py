"""What runs on a site: the site agent (geotrain.site.agent) and its Ray workers."""
