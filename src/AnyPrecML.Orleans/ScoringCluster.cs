using System.Net;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;
using Orleans.Hosting;

namespace AnyPrecML.Orleans;

/// <summary>How a silo or client finds the cluster: localhost clustering (the embedded default) or Redis.</summary>
public sealed record ScoringClusterOptions
{
    /// <summary>Redis "host:port" for membership and job state; null: localhost clustering and in-memory job state.</summary>
    public string? Redis { get; init; }
    /// <summary>Silo-to-silo port of this silo.</summary>
    public int SiloPort { get; init; } = 11111;
    /// <summary>Client gateway port of this silo.</summary>
    public int GatewayPort { get; init; } = 30000;
    /// <summary>Localhost clustering only: the silo port of the primary silo, which holds the membership table.</summary>
    public int PrimarySiloPort { get; init; } = 11111;
    /// <summary>Localhost clustering only: gateway ports a client tries.</summary>
    public IReadOnlyList<int> GatewayPorts { get; init; } = [30000];
    /// <summary>This deployment of the cluster (membership is per cluster id).</summary>
    public string ClusterId { get; init; } = "anyprec";
    /// <summary>The service across deployments (job state is per service id).</summary>
    public string ServiceId { get; init; } = "anyprec";
}

/// <summary>Silo and client configuration of the scoring cluster.</summary>
public static class ScoringCluster
{
    /// <summary>Grain storage holding job state.</summary>
    public const string StorageName = "scoring";

    /// <summary>The scoring grains' services: the silo's open parents and the worker placement. Add a grain storage named <see cref="StorageName"/>.</summary>
    public static ISiloBuilder AddAnyPrecisionScoring(this ISiloBuilder silo, string modelsDirectory)
    {
        silo.Services.AddSingleton(new ScoringSiloOptions { ModelsDirectory = modelsDirectory });
        silo.Services.AddSingleton<ParentModels>();
        silo.AddPlacementDirector<SiloPinnedPlacement, SiloPinnedPlacementDirector>();
        // A killed silo is suspected after missed probes a few seconds apart and declared dead by the others; its
        // in-flight shard's call then fails and the shard is handed to another silo.
        silo.Configure<ClusterMembershipOptions>(o =>
        {
            o.ProbeTimeout = TimeSpan.FromSeconds(2);
            o.NumMissedProbesLimit = 2;
            o.TableRefreshTimeout = TimeSpan.FromSeconds(5);
        });
        return silo;
    }

    /// <summary>A silo host: clustering and storage from <paramref name="options"/>, the scoring grains, models under <paramref name="modelsDirectory"/>.</summary>
    public static IHost BuildSilo(ScoringClusterOptions options, string modelsDirectory, Action<ILoggingBuilder>? logging = null)
    {
        var builder = Host.CreateApplicationBuilder();
        logging?.Invoke(builder.Logging);
        builder.UseOrleans(silo =>
        {
            silo.Configure<ClusterOptions>(o => (o.ClusterId, o.ServiceId) = (options.ClusterId, options.ServiceId));
            if (options.Redis is { } redis)
            {
                silo.UseRedisClustering(redis);
                silo.AddRedisGrainStorage(StorageName, o => o.ConfigurationOptions = StackExchange.Redis.ConfigurationOptions.Parse(redis));
                silo.ConfigureEndpoints(IPAddress.Loopback, options.SiloPort, options.GatewayPort, listenOnAnyHostAddress: false);
            }
            else
            {
                silo.UseLocalhostClustering(options.SiloPort, options.GatewayPort, new IPEndPoint(IPAddress.Loopback, options.PrimarySiloPort), options.ServiceId, options.ClusterId);
                silo.AddMemoryGrainStorage(StorageName);
            }
            silo.AddAnyPrecisionScoring(modelsDirectory);
        });
        return builder.Build();
    }

    /// <summary>A client host that connects to the cluster described by <paramref name="options"/>.</summary>
    public static IHost BuildClient(ScoringClusterOptions options, Action<ILoggingBuilder>? logging = null)
    {
        var builder = Host.CreateApplicationBuilder();
        logging?.Invoke(builder.Logging);
        builder.UseOrleansClient(client =>
        {
            client.Configure<ClusterOptions>(o => (o.ClusterId, o.ServiceId) = (options.ClusterId, options.ServiceId));
            if (options.Redis is { } redis) client.UseRedisClustering(redis);
            else client.UseLocalhostClustering([.. options.GatewayPorts], options.ServiceId, options.ClusterId);
        });
        return builder.Build();
    }
}
