"""A form body in a charset that is no ASCII superset is read as Jetty reads it
(a red team, session 53, found these past the gateway).

Spring's HiddenHttpMethodFilter on Jetty 9.4 (Debian's libjetty9-java,
libspring-web-java) reads a POST's urlencoded form in the charset its Content-Type
names: with `charset=UTF-16` Jetty decodes the whole body (UrlEncoded.decodeUtf16To)
before it splits it at '&' and '=', and in other charsets it splits the bytes at
ASCII '&' and '=' and decodes each name and value (`_method` in EBCDIC around an
ASCII '='). Read as bytes, such a form held no `_method` and Jetty ran DELETE. The
gateway now reads a form in each charset the Content-Type may be read to name (a
decoy `xcharset=` or one in a quoted value too) whole, decoded then split and split
then decoded (proxy/policy/form_body.py `_read_decoded`), and refuses its override
(`ambiguous_method`, 400) as it refuses the plain `_method=DELETE` (the control);
an honest form passes. Both gateway paths.
"""

from __future__ import annotations

import base64
import subprocess

import pytest
from support import sandbox
from support.servers import run_beside
from test_form_method_overrides import IP, PLAIN, RULES, URLS  # noqa: E402
from test_framework_suffixes import classpath  # noqa: E402

pytestmark = pytest.mark.e2e

APP = r"""
import java.io.*;
import java.util.EnumSet;
import javax.servlet.*;
import javax.servlet.http.*;
import org.eclipse.jetty.server.*;
import org.eclipse.jetty.servlet.*;
import org.springframework.web.filter.HiddenHttpMethodFilter;

public class FormApp {
  public static void main(String[] a) throws Exception {
    String ip = a[0]; int port = Integer.parseInt(a[1]); final String log = a[2];
    Server server = new Server();
    ServerConnector c = new ServerConnector(server); c.setHost(ip); c.setPort(port);
    server.addConnector(c);
    ServletContextHandler ctx = new ServletContextHandler();
    ctx.addFilter(new FilterHolder(new HiddenHttpMethodFilter()), "/*",
        EnumSet.of(DispatcherType.REQUEST));
    ctx.addServlet(new ServletHolder(new HttpServlet() {
      protected void service(HttpServletRequest req, HttpServletResponse res) throws IOException {
        String line = "ran " + req.getMethod() + " " + req.getRequestURI() + "\n";
        try (FileWriter w = new FileWriter(log, true)) { w.write(line); }
        res.setContentType("text/plain"); res.getWriter().write(line);
      }
    }), "/*");
    server.setHandler(ctx);
    server.start(); server.join();
  }
}
"""

FORM = "application/x-www-form-urlencoded"


def post(url: str, content_type: str, body: bytes) -> str:
    b64 = base64.b64encode(body).decode()
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        "-H", f"Content-Type: {content_type}", "--data-binary", "@body.bin", url
    )


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_spring_reads_form_in_its_charset(net, tmp_path, profile):
    cp = classpath()
    (tmp_path / "FormApp.java").write_text(APP)
    subprocess.run(
        ["javac", "-nowarn", "--release", "8", "-cp", cp, "-d", str(tmp_path),
         str(tmp_path / "FormApp.java")], check=True, capture_output=True,
    )  # fmt: skip
    log = tmp_path / "spring.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    steps = {
        "honest": post(url, FORM, b"a=1"),
        "control": post(url, FORM, b"_method=DELETE"),
        "utf16_be": post(url, FORM + "; charset=UTF-16", "_method=DELETE".encode("utf-16-be")),
        "utf16_bom": post(url, FORM + "; charset=UTF-16", "_method=DELETE".encode("utf-16")),
        # Jetty takes the `charset` parameter; a decoy before it named ASCII.
        "decoy_param_name": post(
            url, FORM + "; xcharset=utf-8; charset=UTF-16", "_method=DELETE".encode("utf-16-be")
        ),
        "decoy_quoted_value": post(
            url,
            FORM + '; a="charset=utf-8"; charset=UTF-16',
            "_method=DELETE".encode("utf-16-be"),
        ),
        # Jetty's UrlEncoded.decodeTo for other charsets splits the BYTES at ASCII '&'
        # and '=' and decodes each name and value in the charset: EBCDIC tokens around
        # an ASCII '=' are `_method=DELETE` to it; decoded whole, '=' is no '='.
        "ebcdic_tokens": post(
            url,
            FORM + "; charset=IBM037",
            "_method".encode("cp037") + b"=" + "DELETE".encode("cp037"),
        ),
    }
    argv = ["java", "-Djava.net.preferIPv4Stack=true", "-cp", f"{cp}:{tmp_path}", "FormApp"]
    result = run_beside(
        net, tmp_path, [[*argv, IP, str(PLAIN), str(log)]], [f"{IP}:{PLAIN}"], steps, rules,
        profile,
    )  # fmt: skip
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "ran POST /items/1" in result["honest"].out, why
    assert result["control"].status == 400, why
    tricks = ("utf16_be", "utf16_bom", "decoy_param_name", "decoy_quoted_value", "ebcdic_tokens")
    assert {k: result[k].status for k in tricks} == dict.fromkeys(tricks, 400), why
    assert "DELETE" not in ran, why
