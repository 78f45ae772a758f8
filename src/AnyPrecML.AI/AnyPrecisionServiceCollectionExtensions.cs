using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;

namespace AnyPrecML.AI;

/// <summary>Registers an <see cref="AnyPrecisionChatClient"/> with dependency injection.</summary>
public static class AnyPrecisionServiceCollectionExtensions
{
    /// <summary>
    /// Registers the any-precision model in <paramref name="modelDirectory"/> as a singleton
    /// <see cref="AnyPrecisionChatClient"/> and as the <see cref="IChatClient"/>; the returned builder adds
    /// Microsoft.Extensions.AI middleware (logging, caching, OpenTelemetry) on top: <c>.UseLogging().UseDistributedCache()</c>.
    /// </summary>
    public static ChatClientBuilder AddAnyPrecisionChatClient(this IServiceCollection services, string modelDirectory, Action<AnyPrecisionChatClientOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentException.ThrowIfNullOrEmpty(modelDirectory);
        services.AddSingleton(_ =>
        {
            var options = new AnyPrecisionChatClientOptions();
            configure?.Invoke(options);
            return new AnyPrecisionChatClient(modelDirectory, options);
        });
        return services.AddChatClient(sp => sp.GetRequiredService<AnyPrecisionChatClient>());
    }
}
