/*
 * api_page.c - the reseller status page (contract: api_page.h). Written with fprintf onto a
 * memory stream; every value from the spool or the request goes through esc().
 *
 * Links are relative ("status", "v1/users.csv"), so the page also works behind a reverse
 * proxy that serves it under a path prefix.
 */
#include "api_page.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Colours: text #1a1a1a on #ffffff (17:1), links #0b4fbf (7.3:1), banner text on #fdecea
 * and #fff4e0 stays #1a1a1a (>= 15:1); borders carry the colour, headings the words. */
static const char page_css[] =
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;"
    "color:#1a1a1a;background:#fff;line-height:1.5}"
    "header,main,footer{max-width:72rem;margin:0 auto;padding:0 1rem}"
    "h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem}h3{font-size:1.05rem;margin:0}"
    "a{color:#0b4fbf}:focus{outline:3px solid #0b4fbf;outline-offset:2px}"
    ".skip{position:absolute;left:-999rem}.skip:focus{left:1rem;top:.5rem;background:#fff}"
    ".banner{border-left:.5rem solid #b00020;background:#fdecea;padding:.75rem 1rem;"
    "margin:.75rem 0}.banner.resuming,.banner.delivering{border-color:#8a5a00;"
    "background:#fff4e0}.banner p{margin:.25rem 0}"
    ".ok{border-left:.5rem solid #1b5e20;background:#e8f5e9;padding:.75rem 1rem}"
    "dl.counts{display:flex;flex-wrap:wrap;gap:1rem 2.5rem;margin:0}"
    "dl.counts dt{font-weight:600}dl.counts dd{margin:0;font-size:1.4rem}"
    "form{margin:1rem 0}input[type=search]{font-size:1rem;padding:.3rem;"
    "border:1px solid #595959;min-width:18rem}"
    "button{font-size:1rem;padding:.3rem .8rem;border:1px solid #0b4fbf;background:#0b4fbf;"
    "color:#fff}"
    "table{border-collapse:collapse;width:100%}caption{text-align:left;font-weight:600;"
    "padding:.5rem 0}th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid "
    "#767676;vertical-align:top}thead th{background:#f2f2f2}tbody th{font-weight:400;"
    "overflow-wrap:anywhere;min-width:12rem}";

void api_page_escape(void *file, const char *s)
{
    FILE *f = file;

    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&#39;", f); break;
        default:
            if ((unsigned char)*s < 0x20 && *s != '\t')
                fputc(' ', f);       /* control characters show as a blank */
            else
                fputc(*s, f);
        }
    }
}

#define esc(f, s) api_page_escape(f, s)

static void time_el(FILE *f, int64_t t, const char *id)
{
    char iso[32];

    api_time(t, iso, sizeof(iso));
    if (!iso[0]) {
        fputs("-", f);
        return;
    }
    fprintf(f, "<time%s%s%s datetime=\"%s\">", id ? " id=\"" : "", id ? id : "", id ? "\"" : "",
            iso);
    /* "2024-05-01 12:00 UTC": the ISO form without T and seconds reads better */
    fprintf(f, "%.10s %.5s UTC</time>", iso, iso + 11);
}

static void banner(FILE *f, const struct api_mstore *m)
{
    const char *cls = strcmp(m->state, "ramping") == 0 ? "banner resuming"
                    : strcmp(m->state, "active") == 0 ? "banner delivering" : "banner";

    fprintf(f, "<section class=\"%s\" aria-labelledby=\"ms-", cls);
    esc(f, m->name);
    fputs("\"><h3 id=\"ms-", f);
    esc(f, m->name);
    fputs("\">Mailbox server ", f);
    esc(f, m->name);
    fputs(": ", f);
    esc(f, api_state_words(m->state));
    fputs("</h3>", f);
    if (m->since && strcmp(m->state, "active") != 0) {
        fputs("<p>Since ", f);
        time_el(f, m->since, NULL);
        fputs(".</p>", f);
    }
    if (m->public_reason[0]) {
        fputs("<p class=\"reason\">", f);
        esc(f, m->public_reason);
        fputs("</p>", f);
    }
    fprintf(f, "<p>%ld mailbox%s of yours %s %ld message%s waiting here%s. Mail is kept safely "
            "and delivered when service resumes; nothing is returned to the senders.</p>"
            "</section>\n", m->users, m->users == 1 ? "" : "es", m->users == 1 ? "has" : "have",
            m->messages, m->messages == 1 ? "" : "s",
            m->held ? " (some held for our staff to review)" : "");
}

struct rows {
    FILE *f;
    const struct api_snap *s;
    int shown;
};

static int row(const struct api_user *u, void *arg)
{
    struct rows *r = arg;
    const struct api_mstore *m = api_view_mstore(r->s, u->mailstore);
    char outcome[API_OUTCOME_MAX];

    if (r->shown == API_PAGE_ROWS)
        return 1;
    r->shown++;
    api_outcome(u, m ? m->state : "active", outcome, sizeof(outcome));
    fputs("<tr><th scope=\"row\">", r->f);
    esc(r->f, u->display);
    fputs("</th><td>", r->f);
    esc(r->f, u->mailstore);
    fprintf(r->f, "</td><td>%ld%s</td><td>", u->messages, u->held ? " (held)" : "");
    time_el(r->f, u->oldest, NULL);
    fputs("</td><td>", r->f);
    time_el(r->f, u->last_attempt, NULL);
    fputs("</td><td>", r->f);
    esc(r->f, outcome);
    fputs("</td></tr>\n", r->f);
    return 0;
}

char *api_page_render(const struct api_snap *s, const struct tenant *t,
                      const struct api_page_opts *o, size_t *len)
{
    char *buf = NULL, disp[DOMAIN_MAX * 2];
    FILE *f = open_memstream(&buf, len);
    struct rows r = { .s = s };
    struct api_select sel = { .search = o->search };
    const char *next;
    size_t total;

    if (!f)
        return NULL;
    r.f = f;
    fprintf(f, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta http-equiv=\"refresh\" content=\"%d\">\n<title>Mail delivery status: ",
            o->refresh_s);
    esc(f, t->name);
    fprintf(f, "</title>\n<style>%s</style>\n</head>\n<body>\n"
            "<a class=\"skip\" href=\"#list\">Skip to the affected mailboxes</a>\n"
            "<header>\n<h1>Mail delivery status</h1>\n<p>For <strong>", page_css);
    esc(f, t->name);
    fputs("</strong> (", f);
    for (int i = 0; i < t->ndomains && i < 20; i++) {
        domain_display(t->domains[i], disp, sizeof(disp));
        fputs(i ? ", " : "", f);
        esc(f, disp);
    }
    if (t->ndomains > 20)
        fprintf(f, " and %d more", t->ndomains - 20);
    fputs("). Updated ", f);
    time_el(f, s->built, "generated");
    fprintf(f, ". This page reloads itself every %d second%s.</p>\n</header>\n<main>\n",
            o->refresh_s, o->refresh_s == 1 ? "" : "s");

    if (s->nmissing > 0) {      /* a partial answer says so first */
        fputs("<section class=\"banner\" id=\"fleet-partial\" aria-labelledby=\"partial\">\n"
              "<h2 id=\"partial\">This list may be incomplete</h2>\n<p>Some of our mail servers "
              "did not answer just now; mailboxes whose mail waits only there are not shown:"
              "</p>\n<ul>\n", f);
        for (size_t i = 0; i < s->nmissing; i++) {
            fputs("<li><strong>", f);
            esc(f, s->missing[i].node);
            fputs("</strong>: ", f);
            esc(f, s->missing[i].why);
            fputs("</li>\n", f);
        }
        fputs("</ul>\n</section>\n", f);
    }
    fputs("<section aria-labelledby=\"incidents\">\n<h2 id=\"incidents\">Incidents</h2>\n", f);
    if (s->nms == 0)
        fputs("<p class=\"ok\">None of your mailboxes has mail waiting: delivery is normal."
              "</p>\n", f);
    for (size_t i = 0; i < s->nms; i++)
        banner(f, &s->ms[i]);
    fputs("</section>\n", f);

    fprintf(f, "<section aria-labelledby=\"summary\">\n<h2 id=\"summary\">Summary</h2>\n"
            "<dl class=\"counts\"><div><dt>Mailboxes affected</dt><dd id=\"count-mailboxes\">"
            "%zu</dd></div><div><dt>Messages waiting</dt><dd id=\"count-messages\">%ld</dd>"
            "</div><div><dt>Held for review</dt><dd id=\"count-held\">%ld</dd></div><div><dt>"
            "Oldest waiting since</dt><dd>", s->nusers, s->messages, s->held);
    time_el(f, s->oldest, NULL);
    fputs("</dd></div></dl>\n</section>\n", f);

    fputs("<section aria-labelledby=\"list\">\n<h2 id=\"list\">Affected mailboxes</h2>\n"
          "<form method=\"get\" action=\"status\" role=\"search\">\n"
          "<label for=\"q\">Find a mailbox (any part of the address)</label>\n"
          "<input type=\"search\" id=\"q\" name=\"q\" maxlength=\"200\" value=\"", f);
    esc(f, o->search ? o->search : "");
    fputs("\">\n<button type=\"submit\">Search</button>\n", f);
    if (o->search && *o->search)
        fputs("<a href=\"status\">Show all</a>\n", f);
    fputs("</form>\n<p><a href=\"v1/users.csv\">Download the full list (CSV)</a></p>\n", f);
    /* rows first into their own stream: the caption needs the count they make */
    char *rows = NULL;
    size_t rlen = 0;
    FILE *rf = open_memstream(&rows, &rlen);
    if (!rf) {
        fclose(f);
        free(buf);
        return NULL;
    }
    r.f = rf;
    total = api_view_select(s, &sel, row, &r, &next);
    fclose(rf);
    fprintf(f, "<table>\n<caption>%zu mailbox%s", total, total == 1 ? "" : "es");
    if (o->search && *o->search) {
        fputs(" matching \u201c", f);
        esc(f, o->search);
        fputs("\u201d", f);
    }
    if ((size_t)r.shown < total)
        fprintf(f, " (the first %d shown: search, or download the list)", r.shown);
    fputs("</caption>\n<thead><tr><th scope=\"col\">Mailbox</th><th scope=\"col\">Server</th>"
          "<th scope=\"col\">Messages waiting</th><th scope=\"col\">Waiting since</th>"
          "<th scope=\"col\">Last attempt</th><th scope=\"col\">Status</th></tr></thead>\n"
          "<tbody id=\"mailboxes\">\n", f);
    if (rows)
        fwrite(rows, 1, rlen, f);
    free(rows);
    fputs("</tbody>\n</table>\n</section>\n</main>\n<footer><p>Times are in UTC. Mail for "
          "your domains is never lost or bounced because a mailbox server is down: it waits "
          "here and is delivered afterwards.</p></footer>\n</body>\n</html>\n", f);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}
