using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Orleans;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec cluster silo|score`: batch scoring past one machine on an Orleans cluster. Localhost clustering with
/// in-memory job state is the default (silos and client on one machine, nothing to install); --redis HOST:PORT keeps
/// membership and job state in Redis for a real cluster.
/// </summary>
internal static class ClusterCommand
{
    public static Command Create() => new("cluster", "Batch scoring on an Orleans cluster: start silos, then submit jobs to them.") { Silo(), Score() };

    private static Option<string?> Redis() => new("--redis") { Description = "Redis HOST:PORT holding membership and job state (default: localhost clustering, in-memory job state)." };
    private static Option<string> ClusterId() => new("--cluster-id") { Description = "This deployment of the cluster (membership).", DefaultValueFactory = _ => "anyprec" };
    private static Option<string> ServiceId() => new("--service-id") { Description = "The service across deployments (job state).", DefaultValueFactory = _ => "anyprec" };

    private static Command Silo()
    {
        var models = new Option<string>("--models") { Description = "Directory of any-precision model directories; a job's --model is a name under it.", DefaultValueFactory = _ => "." };
        var port = new Option<int>("--port") { Description = "Silo-to-silo port.", DefaultValueFactory = _ => 11111 };
        var gateway = new Option<int>("--gateway-port") { Description = "Client gateway port.", DefaultValueFactory = _ => 30000 };
        var primary = new Option<int>("--primary-port") { Description = "Localhost clustering: the silo port of the primary silo (the first one started).", DefaultValueFactory = _ => 11111 };
        var redis = Redis();
        var clusterId = ClusterId();
        var serviceId = ServiceId();
        var command = new Command("silo", "Start a scoring silo: one open parent per model, every width served from it; stops on Ctrl+C or SIGTERM.")
        {
            models, port, gateway, primary, redis, clusterId, serviceId,
        };
        command.SetAction(async (r, ct) =>
        {
            string dir = Path.GetFullPath(r.GetValue(models)!);
            if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"{dir}: no models directory there.");
            var options = new ScoringClusterOptions
            {
                Redis = CheckRedis(r.GetValue(redis)), SiloPort = CheckPort(r.GetValue(port), "--port"), GatewayPort = CheckPort(r.GetValue(gateway), "--gateway-port"),
                PrimarySiloPort = CheckPort(r.GetValue(primary), "--primary-port"), ClusterId = r.GetValue(clusterId)!, ServiceId = r.GetValue(serviceId)!,
            };
            using var host = ScoringCluster.BuildSilo(options, dir, Logging);
            await host.StartAsync(ct);
            r.Out().WriteLine($"silo up: port {options.SiloPort}, gateway {options.GatewayPort}, {(options.Redis is null ? "localhost clustering" : $"redis {options.Redis}")}, models in {dir}");
            r.Out().Flush();
            try { await Task.Delay(Timeout.Infinite, ct); }
            catch (OperationCanceledException) { }
            // Leave the cluster in an orderly way (membership marks this silo dead at once), but not forever: with the
            // membership store gone an orderly exit cannot finish, and the others declare this silo dead by probing.
            using var grace = new CancellationTokenSource(TimeSpan.FromSeconds(20));
            await host.StopAsync(grace.Token);
            return 0;
        });
        return command;
    }

    private static Command Score()
    {
        var model = new Option<string>("--model", "-m") { Description = "The model: a directory name under each silo's --models (or an absolute path).", Required = true };
        var input = new Option<string>("--input", "-i") { Description = "Rows to score: .csv or .tsv (with a header) or .jsonl; reachable at this path from the silos.", Required = true };
        var output = new Option<string>("--output", "-o") { Description = "JSON lines, byte for byte as `anyprec score` writes them; the job's key (resubmitting resumes it).", Required = true };
        var bits = new Option<int>("--bits", "-b") { Description = "Width to score at (seed..parent).", Required = true };
        var column = new Option<string>("--column", "-c") { Description = "The text column (CSV/TSV header name or JSON property).", DefaultValueFactory = _ => "text" };
        var completion = new Option<int>("--completion-tokens") { Description = "Tokens to generate per row (0: score only).", DefaultValueFactory = _ => 0 };
        var engine = CommonOptions.Engine();
        var shardRows = new Option<int>("--shard-rows") { Description = "Input records per shard (the unit of retry and of progress).", DefaultValueFactory = _ => 256 };
        var gateways = new Option<int[]>("--gateway-port") { Description = "Localhost clustering: gateway ports to try.", DefaultValueFactory = _ => [30000], AllowMultipleArgumentsPerToken = true };
        var redis = Redis();
        var clusterId = ClusterId();
        var serviceId = ServiceId();
        var json = CommonOptions.Json();
        var command = new Command("score", "Submit a scoring job to the cluster, show its progress, exit when its output is written.")
        {
            model, input, output, bits, column, completion, engine, shardRows, gateways, redis, clusterId, serviceId, json,
        };
        command.SetAction(async (r, ct) =>
        {
            string inPath = Path.GetFullPath(r.GetValue(input)!);
            if (!File.Exists(inPath)) throw new FileNotFoundException($"{inPath}: no input file there.", inPath);
            if (r.GetValue(shardRows) < 1) throw new ArgumentException($"--shard-rows {r.GetValue(shardRows)} must be at least 1.");
            if (r.GetValue(completion) < 0) throw new ArgumentException($"--completion-tokens {r.GetValue(completion)} must be 0 or more.");
            var spec = new ScoringJobSpec
            {
                Input = inPath, Output = Path.GetFullPath(r.GetValue(output)!), Model = r.GetValue(model)!, Bits = r.GetValue(bits), Column = r.GetValue(column)!,
                CompletionTokens = r.GetValue(completion), Engine = r.GetValue(engine) ?? "onnx", ShardRows = r.GetValue(shardRows),
            };
            var options = new ScoringClusterOptions
            {
                Redis = CheckRedis(r.GetValue(redis)), GatewayPorts = [.. r.GetValue(gateways)!.Select(p => CheckPort(p, "--gateway-port"))],
                ClusterId = r.GetValue(clusterId)!, ServiceId = r.GetValue(serviceId)!,
            };
            using var host = ScoringCluster.BuildClient(options, Logging);
            try { await host.StartAsync(ct); }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                throw new IOException($"no scoring cluster answered ({(options.Redis is null ? $"gateway ports {string.Join(", ", options.GatewayPorts)}" : $"redis {options.Redis}")}): {e.Message}", e);
            }
            var err = r.Err();
            var sw = Stopwatch.StartNew();
            int lastDone = -1;
            var client = host.Services.GetRequiredService<IClusterClient>();
            var log = host.Services.GetRequiredService<ILoggerFactory>().CreateLogger("AnyPrecML.Cli.Cluster");
            var p = await ScoringJobClient.RunAsync(client, spec, p =>
            {
                if (p.Shards == 0 || p.ShardsDone == lastDone) return;
                lastDone = p.ShardsDone;
                err.WriteLine($"cluster score: {p.ShardsDone}/{p.Shards} shards ({p.RecordsDone}/{p.Records} rows), {p.Workers} silos scoring, {p.Retries} retries");
            }, log, ct);
            await host.StopAsync(CancellationToken.None);
            if (p.Status == ScoringJobStatus.Failed) throw new InvalidOperationException($"the job failed: {p.Error}");
            double seconds = sw.Elapsed.TotalSeconds;
            var summary = new
            {
                output = spec.Output, rows = p.Records - p.Rejected, rejected = p.Rejected, shards = p.Shards, shards_scored = p.ShardsScoredNow,
                shards_already_done = p.ShardsAlreadyDone, retries = p.Retries, silos = p.Silos, bits = spec.Bits, seconds = Math.Round(seconds, 2),
            };
            if (r.GetValue(json)) r.WriteJson(summary);
            else r.Out().WriteLine($"scored {p.ShardsScoredNow} of {p.Shards} shards ({p.Records - p.Rejected} rows at {spec.Bits} bits) in {seconds:F1} s on {p.Silos} silos" +
                $"{(p.ShardsAlreadyDone > 0 ? $", {p.ShardsAlreadyDone} already done" : "")}{(p.Retries > 0 ? $", {p.Retries} retried" : "")}" +
                $"{(p.Rejected > 0 ? $"; {p.Rejected} rejected into {spec.Output}.errors.jsonl" : "")} → {spec.Output}");
            return 0;
        });
        return command;
    }

    /// <summary>Orleans' own chatter at warnings only; the scoring grains' lines (a shard scored, a shard retried) at information, one line each.</summary>
    private static void Logging(ILoggingBuilder logging)
    {
        logging.ClearProviders();
        logging.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss.fff "; });
        logging.AddConsole(o => o.LogToStandardErrorThreshold = LogLevel.Trace); // stdout carries only the command's result
        logging.SetMinimumLevel(LogLevel.Warning);
        logging.AddFilter("AnyPrecML", LogLevel.Information);
    }

    private static int CheckPort(int port, string name) =>
        port is >= 1 and <= 65535 ? port : throw new ArgumentException($"{name} must be in 1..65535, not {port}.");

    private static string? CheckRedis(string? redis)
    {
        if (redis is null) return null;
        int colon = redis.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(redis[(colon + 1)..], out int port) || port is < 1 or > 65535)
            throw new ArgumentException($"--redis '{redis}' must be HOST:PORT.");
        return redis;
    }
}
