using System.CommandLine;
using AnyPrecML.AI;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace AnyPrecML.Cli;

/// <summary>`anyprec serve`: the OpenAI HTTP API over one any-precision parent, every width one model name away.</summary>
internal static class ServeCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        model.Description = "An any-precision model directory (made by `anyprec quantize`).";
        var bits = CommonOptions.Bits();
        bits.Description = "Width of requests that name none (default: the parent width).";
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var port = new Option<int>("--port") { Description = "TCP port (0: any free port; the address is printed).", DefaultValueFactory = _ => 8080 };
        var host = new Option<string>("--host") { Description = "Address to listen on.", DefaultValueFactory = _ => "127.0.0.1" };
        var name = new Option<string?>("--name") { Description = "Model name in model ids (default: the directory's name)." };
        var template = new Option<string?>("--chat-template") { Description = "plain, llama2, llama3, chatml or zephyr (default: detected from tokenizer_config.json)." };
        var concurrent = new Option<int>("--max-concurrent") { Description = "Requests generating at once (their decode steps at one width share passes).", DefaultValueFactory = _ => 16 };
        var maxBatch = CommonOptions.MaxBatch();
        var queue = new Option<int>("--max-queue") { Description = "Requests waiting for a slot before 429.", DefaultValueFactory = _ => 64 };
        var command = new Command("serve", "Serve an any-precision model over the OpenAI HTTP API (/v1/models, /v1/chat/completions, /v1/completions, /health).")
        {
            model, bits, accuracy, kvCache, port, host, name, template, concurrent, queue, maxBatch,
        };
        command.SetAction(async (r, ct) =>
        {
            string directory = r.GetValue(model)!;
            if (!Directory.Exists(directory) || !Models.LlamaCheckpoint.IsAnyPrecision(directory))
                throw new ArgumentException($"'{directory}' is not an any-precision model directory (quantize one with `anyprec quantize`).");
            if (r.GetValue(port) is < 0 or > 65535) throw new ArgumentException($"--port must be in 0..65535, not {r.GetValue(port)}.");
            if (r.GetValue(concurrent) < 1) throw new ArgumentException("--max-concurrent must be 1 or more.");
            if (r.GetValue(queue) < 0) throw new ArgumentException("--max-queue must be 0 or more.");
            if (r.GetValue(maxBatch) < 1) throw new ArgumentException("--max-batch must be 1 or more.");
            var server = new AnyPrecisionServerOptions { MaxConcurrentRequests = r.GetValue(concurrent), MaxQueuedRequests = r.GetValue(queue) };

            await using var app = Host(directory, $"http://{r.GetValue(host)}:{r.GetValue(port)}", server, o =>
            {
                o.DefaultBits = r.GetValue(bits);
                o.ModelName = r.GetValue(name);
                o.ChatTemplate = r.GetValue(template);
                o.Backend = CommonOptions.Backend(r.GetValue(accuracy));
                o.KvCacheType = CommonOptions.CacheType(r.GetValue(kvCache));
                o.MaxBatch = r.GetValue(maxBatch);
            });
            var client = app.Services.GetRequiredService<AnyPrecisionChatClient>();
            await app.StartAsync(ct);
            string address = Address(app);
            var m = client.Metadata;
            r.Out().WriteLine($"listening on {address}: {string.Join(", ", m.ModelIds)} (template {m.Template.Name}, default {m.DefaultBits} bits)");
            r.Out().Flush();
            // Ctrl+C or SIGTERM stops the host (its console lifetime), which ends the wait; so does the command's token.
            await app.WaitForShutdownAsync(ct);
            return 0;
        });
        return command;
    }

    /// <summary>
    /// The server of `serve` and `bench serve`: Kestrel on <paramref name="url"/> with the OpenAI endpoints over the
    /// model, opened before it listens (a bad directory fails here with its message, not on the first request).
    /// </summary>
    public static WebApplication Host(string directory, string url, AnyPrecisionServerOptions server, Action<AnyPrecisionChatClientOptions> configure)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.SetMinimumLevel(LogLevel.Warning);
        builder.WebHost.UseUrls(url);
        builder.WebHost.ConfigureKestrel(k => k.Limits.MaxRequestBodySize = server.MaxRequestBodyBytes);
        builder.Services.AddAnyPrecisionChatClient(directory, configure);
        var app = builder.Build();
        try
        {
            app.Services.GetRequiredService<AnyPrecisionChatClient>();
            app.MapAnyPrecisionOpenAI(server);
            return app;
        }
        catch
        {
            ((IDisposable)app).Dispose();
            throw;
        }
    }

    /// <summary>The address a started host listens on (the real port when 0 was asked).</summary>
    public static string Address(WebApplication app) =>
        app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
}
