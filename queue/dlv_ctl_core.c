/*
 * dlv_ctl_core.c - the bottom floor of sluice-deliver's control commands (dlv_ctl_core.h):
 * a request's arguments read from its JSON, for the loop side (dlv_ctl_args.c, dlv_ctl.c)
 * and the read commands alike.
 */
#include "dlv_ctl_core.h"

#include <jansson.h>
#include <stdint.h>

#include "conf.h"

const char *dc_jstr(const json_t *req, const char *key)
{
    const char *s = json_string_value(json_object_get(req, key));
    return s && *s ? s : NULL;
}

/* dc_dur_arg - a duration as a number of seconds or a string like "10m": ms, or -1 when absent,
 * -2 when malformed. */
int64_t dc_dur_arg(const json_t *req, const char *key)
{
    const json_t *v = json_object_get(req, key);
    int64_t ms;

    if (!v || json_is_null(v))
        return -1;
    if (json_is_number(v))
        return json_number_value(v) < 0 ? -2 : (int64_t)(json_number_value(v) * 1000.0);
    if (!json_is_string(v) || conf_parse_duration(json_string_value(v), &ms) < 0)
        return -2;
    return ms;
}
