// A multi-tenant app on the JDK's HTTP server that picks its tenant by the host
// Spring reports for the request (UriComponentsBuilder.fromHttpRequest: the Host,
// or Forwarded's / X-Forwarded-Host's host, as Spring's ForwardedHeaderFilter and
// ServletUriComponentsBuilder.fromCurrentRequest read it). allowed.test is the
// allowed tenant (on the port the app listens on, or none); any other host or port
// is served by the forbidden one (a catch-all).
// usage: java -cp ... SpringTenants IP PORT LOG
import com.sun.net.httpserver.HttpServer;
import java.io.FileWriter;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import org.springframework.http.HttpHeaders;
import org.springframework.http.HttpMethod;
import org.springframework.http.HttpRequest;
import org.springframework.web.util.UriComponentsBuilder;

public class SpringTenants {
    public static void main(String[] args) throws Exception {
        String ip = args[0];
        int port = Integer.parseInt(args[1]);
        FileWriter log = new FileWriter(args[2], true);
        HttpServer server = HttpServer.create(new InetSocketAddress(ip, port), 16);
        server.createContext("/", exchange -> {
            HttpHeaders headers = new HttpHeaders();
            for (Map.Entry<String, List<String>> e : exchange.getRequestHeaders().entrySet())
                headers.put(e.getKey(), e.getValue());
            String hostHeader = headers.getFirst("Host");
            URI uri = URI.create("http://" + hostHeader + exchange.getRequestURI().getRawPath());
            HttpRequest request = new HttpRequest() {
                public HttpMethod getMethod() { return HttpMethod.resolve(exchange.getRequestMethod()); }
                public URI getURI() { return uri; }
                public HttpHeaders getHeaders() { return headers; }
            };
            org.springframework.web.util.UriComponents seen = UriComponentsBuilder.fromHttpRequest(request).build();
            String host = seen.getHost();
            int seenPort = seen.getPort();
            // The allowed tenant is allowed.test on the port the rules allow (or none).
            boolean allowed = "allowed.test".equals(host) && (seenPort == -1 || seenPort == port);
            String label = allowed ? "ALLOWED-SPRING-TENANT" : "FORBIDDEN-SPRING-TENANT";
            synchronized (log) {
                log.write(label + " got path=" + exchange.getRequestURI().getRawPath() + " spring_host=" + host + " spring_port=" + seenPort
                        + " host=" + hostHeader + " forwarded=" + headers.getFirst("Forwarded") + "\n");
                log.flush();
            }
            byte[] body = ("SECRET of " + label + "\n").getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            try (OutputStream out = exchange.getResponseBody()) { out.write(body); }
        });
        server.start();
        synchronized (log) { log.write("ready\n"); log.flush(); }
    }
}
